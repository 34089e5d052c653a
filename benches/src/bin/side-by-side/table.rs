//! The tables: each figure's mean over the runs with its range, then the means
//! as ratios to `direct` and to the matching HAProxy row.

use std::fmt::Write as _;

/// The figures of one row in one run, in the table's column order; `None` where
/// the row has no such figure (no proxy, no raw TCP, no WAN).
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub row: &'static str,
    pub figures: [Option<f64>; COLUMNS.len()],
}

pub const COLUMNS: [&str; 12] = [
    "req/s (wrk -t2 -c50)",
    "p50 ms",
    "p99 ms",
    "paced req/s",
    "1 MiB/s",
    "raw TCP Gbit/s",
    "new conn/s",
    "CPU us/req",
    "RSS idle KiB",
    "RSS load KiB",
    "errors (all runs)",
    "TTFB ms, new conn, WAN",
];
/// The column summed over the runs rather than averaged.
pub const ERRORS: usize = 10;
/// The columns of the ratio table.
const RATIO_COLUMNS: [usize; 9] = [0, 1, 2, 3, 4, 5, 6, 7, 11];

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The HAProxy row an isthmus row is compared with.
fn peer(row: &str) -> Option<&'static str> {
    match row {
        "isthmus-passthrough" => Some("haproxy-tcp"),
        "isthmus-http" => Some("haproxy-http"),
        "isthmus-chain" => Some("haproxy-chain"),
        _ => None,
    }
}

struct Column {
    values: Vec<f64>,
}

impl Column {
    fn mean(&self) -> Option<f64> {
        (!self.values.is_empty())
            .then(|| self.values.iter().sum::<f64>() / self.values.len() as f64)
    }

    fn cell(&self, c: usize) -> String {
        let Some(mean) = self.mean() else {
            return "-".into();
        };
        if c == ERRORS {
            return format!("{}", self.values.iter().sum::<f64>() as u64);
        }
        if self.values.len() == 1 {
            return fmt(mean);
        }
        let lo = self.values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = self
            .values
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        format!("{} [{}-{}]", fmt(mean), fmt(lo), fmt(hi))
    }
}

/// The rows in first-seen order, each with its columns.
fn collect(samples: &[Sample]) -> Vec<(&'static str, Vec<Column>)> {
    let mut rows: Vec<(&'static str, Vec<Column>)> = Vec::new();
    for s in samples {
        let i = match rows.iter().position(|(r, _)| *r == s.row) {
            Some(i) => i,
            None => {
                let columns = COLUMNS
                    .iter()
                    .map(|_| Column { values: Vec::new() })
                    .collect();
                rows.push((s.row, columns));
                rows.len() - 1
            }
        };
        for (c, v) in s.figures.iter().enumerate() {
            if let Some(v) = v {
                rows[i].1[c].values.push(*v);
            }
        }
    }
    rows
}

/// Both tables and their notes, as Markdown.
pub fn render(samples: &[Sample], lat_conns: u32, pace_ms: u32, wan_ms: u32) -> String {
    let rows = collect(samples);
    let mut out = String::new();
    let header = |out: &mut String, names: &mut dyn Iterator<Item = &str>| {
        let names: Vec<&str> = names.collect();
        let _ = writeln!(out, "| row | {} |", names.join(" | "));
        let _ = writeln!(out, "| --- |{}", " ---: |".repeat(names.len()));
    };
    header(&mut out, &mut COLUMNS.iter().copied());
    for (row, columns) in &rows {
        let cells: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(c, col)| col.cell(c))
            .collect();
        let _ = writeln!(out, "| {row} | {} |", cells.join(" | "));
    }
    let _ = writeln!(
        out,
        "\nratios (row / direct ; row / matching HAProxy row)\n"
    );
    header(&mut out, &mut RATIO_COLUMNS.iter().map(|c| COLUMNS[*c]));
    let mean = |row: &str, c: usize| {
        rows.iter()
            .find(|(r, _)| *r == row)
            .and_then(|(_, cols)| cols[c].mean())
    };
    let ratio = |row: &str, base: &str, c: usize| match (mean(row, c), mean(base, c)) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    };
    for (row, _) in rows.iter().filter(|(r, _)| *r != "direct") {
        let cells: Vec<String> = RATIO_COLUMNS
            .iter()
            .map(|c| match peer(row) {
                Some(p) => format!("{} ; {}", ratio(row, "direct", *c), ratio(row, p, *c)),
                None => ratio(row, "direct", *c),
            })
            .collect();
        let _ = writeln!(out, "| {row} | {} |", cells.join(" | "));
    }
    let _ = writeln!(
        out,
        "\nTTFB: median of 20 requests, each on a new connection, with {wan_ms} ms each way between the chains' second and third hops."
    );
    let _ = writeln!(
        out,
        "p50/p99: {lat_conns} connections, each pausing {pace_ms} ms between requests (see paced req/s)."
    );
    let _ = writeln!(
        out,
        "CPU us/req: user+system time of the row's proxies and of every process in the origin namespace (nginx; the chain rows' second and third hops) during the saturation load, per request; wrk is not counted. RSS: summed over the row's proxies."
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(row: &'static str, rps: f64, errors: f64) -> Sample {
        let mut figures = [None; COLUMNS.len()];
        figures[0] = Some(rps);
        figures[ERRORS] = Some(errors);
        Sample { row, figures }
    }

    #[test]
    fn means_ranges_sums_and_ratios() {
        let samples = [
            sample("direct", 1000.0, 0.0),
            sample("haproxy-http", 500.0, 1.0),
            sample("isthmus-http", 250.0, 2.0),
            sample("direct", 3000.0, 0.0),
            sample("haproxy-http", 500.0, 3.0),
            sample("isthmus-http", 750.0, 0.0),
        ];
        let text = render(&samples, 10, 10, 20);
        assert!(text.contains("| direct | 2000 [1000-3000] | - |"), "{text}");
        // Errors are summed over the runs, not averaged.
        assert!(text.contains("| 4 | - |"), "{text}");
        assert!(text.contains("| isthmus-http | 0.25 ; 1.00 |"), "{text}");
        assert!(text.contains("| haproxy-http | 0.25 |"), "{text}");
    }
}
