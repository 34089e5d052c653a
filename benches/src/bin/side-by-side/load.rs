//! The loads (wrk, iperf3, curl for time to first byte) and what is read from
//! them and from `/proc`: requests per second, latency percentiles, CPU time per
//! request, resident memory.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use isthmus_netns::{Namespace, wait_with_timeout};

/// Extra time a bounded load gets beyond its own duration before it is killed.
const SLACK: Duration = Duration::from_secs(15);

/// Runs `program args` in `ns`, killed after `limit`; its stdout and stderr.
pub fn run_in(ns: &Namespace, limit: Duration, program: &str, args: &[String]) -> Result<String> {
    let child = ns
        .command(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program} in {ns}"))?;
    let out =
        wait_with_timeout(child, limit).with_context(|| format!("{program} {}", args.join(" ")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {text}",
            args.join(" "),
            out.status
        );
    }
    Ok(text)
}

/// One wrk run's output.
pub struct Wrk(String);

impl Wrk {
    /// `wrk -d <secs>s --timeout 2s <args>` in `ns`, bounded in time. Socket errors
    /// and non-2xx answers are printed and added to `errors`.
    pub fn run(ns: &Namespace, secs: u64, args: &[&str], errors: &mut u64) -> Result<Self> {
        let mut all = vec![format!("-d{secs}s"), "--timeout".into(), "2s".into()];
        all.extend(args.iter().map(|a| a.to_string()));
        let out =
            run_in(ns, Duration::from_secs(secs) + SLACK, "wrk", &all).context("wrk failed")?;
        let wrk = Self(out);
        let seen = wrk.errors();
        if seen > 0 {
            eprintln!(
                "  warning: wrk {} saw {seen} errors or non-2xx answers:",
                args.join(" ")
            );
            for line in wrk.0.lines() {
                if line.contains("Socket errors") || line.contains("Non-2xx") {
                    eprintln!("{line}");
                }
            }
            *errors += seen;
        }
        Ok(wrk)
    }

    fn errors(&self) -> u64 {
        let mut n = 0;
        for line in self.0.lines() {
            if let Some(rest) = line.trim().strip_prefix("Socket errors:") {
                // connect N, read N, write N, timeout N
                n += rest
                    .split(',')
                    .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum::<u64>();
            }
            if line.trim().starts_with("Non-2xx or 3xx responses:") {
                n += last_number(line).unwrap_or(0.0) as u64;
            }
        }
        n
    }

    /// `Requests/sec:`.
    pub fn rps(&self) -> Option<f64> {
        self.0
            .lines()
            .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
    }

    /// The first number of `N requests in ...`.
    pub fn requests(&self) -> Option<f64> {
        self.0
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
    }

    /// Percentile `p` (`50`, `99`) of wrk's latency distribution, in milliseconds.
    pub fn percentile_ms(&self, p: u32) -> Option<f64> {
        let want = format!("{p}%");
        self.0.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == want).then_some(())?;
            duration_ms(f.next()?)
        })
    }
}

fn last_number(line: &str) -> Option<f64> {
    line.split_whitespace().last()?.parse().ok()
}

/// wrk's `1.23ms`, `850.00us`, `1.02s`, `1.50m` in milliseconds.
fn duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (value, unit) = text.split_at(split);
    let factor = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        _ => return None,
    };
    Some(value.parse::<f64>().ok()? * factor)
}

/// `iperf3 -c host -p port -t secs` in `ns`: the receiver's Gbit/s.
pub fn iperf_gbit(ns: &Namespace, host: &str, port: u16, secs: u64) -> Result<f64> {
    let args: Vec<String> = ["-c", host, "-p", &port.to_string(), "-t", &secs.to_string()]
        .iter()
        .map(|s| s.to_string())
        .chain(["-f".into(), "g".into()])
        .collect();
    let out = run_in(ns, Duration::from_secs(secs) + SLACK, "iperf3", &args)
        .with_context(|| format!("iperf3 to {host}:{port} failed"))?;
    out.lines()
        .filter(|l| l.contains("receiver"))
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|w| *w == "Gbits/sec")?;
            f.get(i.checked_sub(1)?)?.parse().ok()
        })
        .with_context(|| format!("no receiver rate in iperf3's output: {out}"))
}

/// Median time to first byte, in ms, of 20 requests to `url/hello`, each on a new
/// connection.
pub fn ttfb_ms(ns: &Namespace, url: &str) -> Result<f64> {
    let mut times = Vec::new();
    for i in 1..=20 {
        let out = ns
            .exec(
                "curl",
                &[
                    "-sf",
                    "-o",
                    "/dev/null",
                    "-m",
                    "5",
                    "-w",
                    "%{time_starttransfer}",
                    &format!("{url}/hello"),
                ],
            )
            .with_context(|| {
                format!("request {i} to {url}/hello failed while measuring time to first byte")
            })?;
        times.push(
            out.trim()
                .parse::<f64>()
                .context("curl's time_starttransfer")?,
        );
    }
    times.sort_by(f64::total_cmp);
    // The lower middle of an even count, as the shell version took.
    Ok(times[times.len().div_ceil(2) - 1] * 1000.0)
}

/// Sum of the resident set sizes (KiB) of `pids`.
pub fn rss_kib(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// CPU clock ticks (user + system) of `pids`.
pub fn cpu_ticks(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|s| {
            // Fields 14 and 15, counted after the command name, which may hold spaces.
            let rest = s.rsplit_once(") ")?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// Samples the RSS of `pids` once a second for `secs` seconds on a thread of its
/// own; [`RssSampler::peak`] ends it.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    pub fn start(pids: Vec<i32>, secs: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = 0;
            for _ in 0..secs {
                std::thread::sleep(Duration::from_secs(1));
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                peak = peak.max(rss_kib(&pids));
            }
            peak
        });
        Self { stop, handle }
    }

    pub fn peak(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 2s test @ http://198.18.0.2:8080/hello
  2 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   850.00us  1.20ms  20.00ms   90.00%
  Latency Distribution
     50%  612.00us
     75%    1.02ms
     90%    1.50ms
     99%    2.10s
  3000 requests in 2.00s, 1.00MB read
  Socket errors: connect 1, read 2, write 0, timeout 4
  Non-2xx or 3xx responses: 5
Requests/sec:   1500.25
Transfer/sec:    500.00KB
";

    #[test]
    fn wrk_output_is_read_like_the_table_needs() {
        let w = Wrk(WRK.to_owned());
        assert_eq!(w.rps(), Some(1500.25));
        assert_eq!(w.requests(), Some(3000.0));
        assert_eq!(w.percentile_ms(50), Some(0.612));
        assert_eq!(w.percentile_ms(99), Some(2100.0));
        assert_eq!(w.errors(), 1 + 2 + 4 + 5);
        assert_eq!(w.percentile_ms(95), None);
    }
}
