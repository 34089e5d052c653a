//! The end-of-run summary, read from each proxy's `/metrics` (OpenMetrics text):
//! connections and HTTP requests per hop, refusals and failed connections by
//! reason.
//!
//! Only the families the proxies document are read (`tcp_open_total`,
//! `http_requests_total`, `tunnel_refusals_total`, `tcp_close_total`); this module
//! does not fetch anything (that is [`super::run`]'s job).

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One sample: family name with suffix, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// `tcp_open_total`, ...
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// The scalar samples (counters, gauges, untyped, and a histogram's `_sum` and
/// `_count`) of an OpenMetrics/Prometheus text exposition, read with
/// `prometheus-parse`; comment and malformed lines are skipped, and so are
/// histogram buckets, which the summary does not use.
pub fn parse(text: &str) -> Vec<Sample> {
    let lines = text.lines().map(|line| Ok(line.to_owned()));
    // Reading from memory cannot fail, and the parser skips what it cannot read.
    let Ok(scrape) = prometheus_parse::Scrape::parse(lines) else {
        return Vec::new();
    };
    scrape
        .samples
        .into_iter()
        .filter_map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(_) | prometheus_parse::Value::Summary(_) => {
                    return None;
                }
            };
            Some(Sample {
                name: s.metric,
                labels: s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                value,
            })
        })
        .collect()
}

/// Sum of `name` over samples whose labels include every `(key, value)` of `with`.
pub fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        // Not `sum()`: an empty float sum is -0, which would print as "-0".
        .fold(0.0, |a, b| a + b)
}

/// One proxy's metrics, or why they could not be read.
#[derive(Debug, Clone)]
pub struct ProxyReport {
    /// The cluster.
    pub cluster: String,
    /// `gateway`, or the pod's name.
    pub name: String,
    /// Whether this is the cluster's gateway.
    pub gateway: bool,
    /// The samples, or the error reading them.
    pub metrics: Result<Vec<Sample>, String>,
}

/// Renders the summary table and one line per gateway saying what it carried.
pub fn render(reports: &[ProxyReport]) -> String {
    let mut out = String::from("== summary (each proxy's /metrics) ==\n");
    let width = reports
        .iter()
        .map(|r| r.cluster.len() + r.name.len() + 1)
        .max()
        .unwrap_or(10)
        .max(10);
    let _ = writeln!(
        out,
        "{:<width$}  {:>7} {:>7} {:>7} {:>7} {:>7}  refused / failed",
        "proxy", "tcp-in", "tcp-out", "gw-tcp", "http-in", "http-out"
    );
    for r in reports {
        let label = format!("{}/{}", r.cluster, r.name);
        let m = match &r.metrics {
            Ok(m) => m,
            Err(e) => {
                let _ = writeln!(out, "{label:<width$}  metrics unavailable: {e}");
                continue;
            }
        };
        let tcp = |d: &str| sum(m, "tcp_open_total", &[("direction", d)]);
        let http = |d: &str| sum(m, "http_requests_total", &[("direction", d)]);
        let _ = writeln!(
            out,
            "{label:<width$}  {:>7} {:>7} {:>7} {:>7} {:>7}  {}",
            tcp("inbound"),
            tcp("outbound"),
            tcp("gateway"),
            http("inbound"),
            http("outbound"),
            problems(m)
        );
    }
    // What the applications saw: their calls, per cluster and authority.
    let mut calls: BTreeMap<(String, String), (f64, f64, f64)> = BTreeMap::new();
    for r in reports.iter().filter(|r| !r.gateway) {
        let Ok(m) = &r.metrics else { continue };
        for s in m
            .iter()
            .filter(|s| s.labels.get("direction").map(String::as_str) == Some("outbound"))
        {
            let Some(authority) = s.labels.get("authority") else {
                continue;
            };
            let entry = calls
                .entry((r.cluster.clone(), authority.clone()))
                .or_default();
            match s.name.as_str() {
                "http_requests_total" => entry.0 += s.value,
                "http_response_latency_seconds_sum" => entry.1 += s.value,
                "http_response_latency_seconds_count" => entry.2 += s.value,
                _ => {}
            }
        }
    }
    for ((cluster, authority), (requests, seconds, responses)) in &calls {
        let mean = if *responses > 0.0 {
            format!(
                "{:.1} ms mean to response headers",
                seconds / responses * 1000.0
            )
        } else {
            "no response".to_owned()
        };
        let _ = writeln!(
            out,
            "{cluster} called {authority}: {requests} requests, {responses} responses, {mean}"
        );
    }
    for r in reports.iter().filter(|r| r.gateway) {
        if let Ok(m) = &r.metrics {
            let streams = sum(m, "tcp_open_total", &[("direction", "gateway")]);
            let refused = sum(m, "tunnel_refusals_total", &[("direction", "gateway")]);
            let _ = writeln!(
                out,
                "gateway of {} carried {streams} tunnel streams ({refused} refused)",
                r.cluster
            );
        }
    }
    out
}

/// Refusals and connections closed for another reason than EOF, by reason.
fn problems(m: &[Sample]) -> String {
    let mut by_reason: BTreeMap<String, f64> = BTreeMap::new();
    for s in m {
        let reason = s.labels.get("reason").cloned().unwrap_or_default();
        let key = match s.name.as_str() {
            "tunnel_refusals_total" => format!("refused:{reason}"),
            "tcp_close_total" if reason != "eof" => format!("closed:{reason}"),
            _ => continue,
        };
        if s.value > 0.0 {
            *by_reason.entry(key).or_default() += s.value;
        }
    }
    if by_reason.is_empty() {
        return "-".to_owned();
    }
    by_reason
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP tcp_open TCP connections accepted\n\
        # TYPE tcp_open counter\n\
        tcp_open_total{direction=\"outbound\"} 4\n\
        tcp_open_total{direction=\"gateway\"} 0\n\
        http_requests_total{direction=\"outbound\",authority=\"hello.default.svc.cluster.local\"} 3\n\
        tunnel_refusals_total{direction=\"outbound\",reason=\"link_down\"} 1\n\
        tcp_close_total{direction=\"outbound\",reason=\"eof\"} 3\n\
        tcp_close_total{direction=\"outbound\",reason=\"upstream_reset\"} 1\n\
        # EOF\n";

    #[test]
    fn samples_and_labels_are_read() {
        let m = parse(TEXT);
        assert_eq!(m.len(), 6);
        assert_eq!(sum(&m, "tcp_open_total", &[("direction", "outbound")]), 4.0);
        assert_eq!(
            m[2].labels.get("authority").map(String::as_str),
            Some("hello.default.svc.cluster.local")
        );
        assert_eq!(problems(&m), "closed:upstream_reset=1 refused:link_down=1");
    }

    #[test]
    fn a_histogram_gives_its_sum_and_count_but_not_its_buckets() {
        let m = parse(
            "# TYPE http_response_latency_seconds histogram\n\
            http_response_latency_seconds_bucket{direction=\"outbound\",le=\"0.1\"} 2\n\
            http_response_latency_seconds_bucket{direction=\"outbound\",le=\"+Inf\"} 3\n\
            http_response_latency_seconds_sum{direction=\"outbound\"} 0.25\n\
            http_response_latency_seconds_count{direction=\"outbound\"} 3\n\
            # EOF\n",
        );
        let names: Vec<&str> = m.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "http_response_latency_seconds_sum",
                "http_response_latency_seconds_count"
            ]
        );
        assert_eq!(
            sum(
                &m,
                "http_response_latency_seconds_count",
                &[("direction", "outbound")]
            ),
            3.0
        );
    }

    #[test]
    fn the_table_names_each_proxy_and_what_gateways_carried() {
        let reports = [
            ProxyReport {
                cluster: "cluster-b".into(),
                name: "gateway".into(),
                gateway: true,
                metrics: Ok(parse("tcp_open_total{direction=\"gateway\"} 7\n")),
            },
            ProxyReport {
                cluster: "cluster-b".into(),
                name: "frontend-0".into(),
                gateway: false,
                metrics: Err("connection refused".into()),
            },
        ];
        let text = render(&reports);
        assert!(
            text.contains("gateway of cluster-b carried 7 tunnel streams"),
            "{text}"
        );
        assert!(
            text.contains("cluster-b/frontend-0  metrics unavailable: connection refused"),
            "{text}"
        );
    }
}
