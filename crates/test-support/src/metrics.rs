//! The admin server's `/metrics` (OpenMetrics text from prometheus-client), parsed
//! by `prometheus-parse` and matched by sample name and labels.
//!
//! Names are the samples' own, as written: a counter family `tcp_open` is read as
//! `tcp_open_total`. Labels are matched the way PromQL writes them,
//! `direction="outbound"`, each matcher one label that must be equal.

use prometheus_parse::{Sample, Scrape, Value};

/// One scrape of a metrics endpoint.
#[derive(Debug, Clone)]
pub struct Metrics {
    samples: Vec<Sample>,
}

impl Metrics {
    /// Parses `text`; fails the test when it is not Prometheus or OpenMetrics text
    /// (an admin server answering an error page, say).
    pub fn parse(text: &str) -> Metrics {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = Scrape::parse(lines)
            .unwrap_or_else(|e| panic!("metrics text does not parse ({e}):\n{text}"));
        Metrics {
            samples: scrape.samples,
        }
    }

    /// The value of the one sample named `name` whose labels satisfy `matchers`,
    /// or `None` when no sample does. Fails the test when several do: the caller
    /// meant [`Metrics::sum`] or forgot a label.
    pub fn get(&self, name: &str, matchers: &[&str]) -> Option<f64> {
        let mut found = self.matching(name, matchers);
        let first = found.next()?;
        assert!(
            found.next().is_none(),
            "several samples of {name} match {matchers:?}"
        );
        Some(first)
    }

    /// The sum of the samples named `name` whose labels satisfy every one of
    /// `matchers`; 0 when there is none.
    pub fn sum(&self, name: &str, matchers: &[&str]) -> f64 {
        self.matching(name, matchers).sum()
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        matchers: &'a [&'a str],
    ) -> impl Iterator<Item = f64> + 'a {
        let wanted: Vec<(&str, &str)> = matchers.iter().map(|m| matcher(m)).collect();
        self.samples
            .iter()
            .filter(move |s| {
                s.metric == name
                    && wanted
                        .iter()
                        .all(|(key, value)| s.labels.get(key) == Some(*value))
            })
            .filter_map(|s| scalar(&s.value))
    }
}

/// [`Metrics::sum`] over `text` in one call: what most assertions want.
pub fn sum(text: &str, name: &str, matchers: &[&str]) -> f64 {
    Metrics::parse(text).sum(name, matchers)
}

/// `key="value"` as a pair; fails the test on any other shape (its own mistake).
fn matcher(m: &str) -> (&str, &str) {
    m.split_once('=')
        .and_then(|(key, value)| {
            let value = value.strip_prefix('"')?.strip_suffix('"')?;
            Some((key, value))
        })
        .unwrap_or_else(|| panic!("label matcher {m:?} is not key=\"value\""))
}

fn scalar(value: &Value) -> Option<f64> {
    match value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
        Value::Histogram(_) | Value::Summary(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What prometheus-client's OpenMetrics encoder writes: a counter whose samples
    /// carry `_total`, a gauge, units, a histogram and the closing `# EOF`.
    const OPENMETRICS: &str = r#"# HELP tcp_open Connections opened.
# TYPE tcp_open counter
tcp_open_total{direction="outbound",protocol="http"} 3
tcp_open_total{direction="inbound",protocol="opaque"} 2
tcp_open_total{direction="outbound",protocol="opaque"} 4
# HELP identity_leaf_expired Whether the leaf is outside its validity.
# TYPE identity_leaf_expired gauge
identity_leaf_expired 0
# HELP tunnel_refusals Refused streams.
# TYPE tunnel_refusals counter
tunnel_refusals_total{reason="no_route",status="404"} 1
# HELP handshake_seconds Handshake time.
# TYPE handshake_seconds histogram
# UNIT handshake_seconds seconds
handshake_seconds_sum 0.5
handshake_seconds_count 2
handshake_seconds_bucket{le="0.1"} 1
handshake_seconds_bucket{le="+Inf"} 2
# EOF
"#;

    #[test]
    fn sums_the_samples_whose_labels_match() {
        let m = Metrics::parse(OPENMETRICS);
        assert_eq!(m.sum("tcp_open_total", &[]), 9.0);
        assert_eq!(m.sum("tcp_open_total", &[r#"direction="outbound""#]), 7.0);
        assert_eq!(
            m.sum(
                "tcp_open_total",
                &[r#"direction="outbound""#, r#"protocol="http""#]
            ),
            3.0
        );
        assert_eq!(m.sum("tcp_open_total", &[r#"direction="sideways""#]), 0.0);
    }

    #[test]
    fn reads_one_sample_and_labels_exactly() {
        let m = Metrics::parse(OPENMETRICS);
        assert_eq!(m.get("identity_leaf_expired", &[]), Some(0.0));
        assert_eq!(
            m.get("tunnel_refusals_total", &[r#"reason="no_route""#]),
            Some(1.0)
        );
        // A label value is equal, never a substring.
        assert_eq!(m.get("tunnel_refusals_total", &[r#"reason="no""#]), None);
        assert_eq!(m.get("handshake_seconds_count", &[]), Some(2.0));
        assert_eq!(m.get("no_such_metric", &[]), None);
    }

    #[test]
    #[should_panic(expected = "several samples of tcp_open_total")]
    fn get_refuses_an_ambiguous_match() {
        Metrics::parse(OPENMETRICS).get("tcp_open_total", &[]);
    }

    #[test]
    #[should_panic(expected = "is not key=\"value\"")]
    fn a_malformed_matcher_is_the_tests_mistake() {
        sum(OPENMETRICS, "tcp_open_total", &["direction=outbound"]);
    }
}
