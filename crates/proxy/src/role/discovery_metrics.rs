//! The discovery source's health as metrics: how old the serving state is, whether
//! the latest reload failed, and how many have.
//!
//! Values are read from the [`Discovery`] handle at scrape time, so the age is exact
//! whenever it is scraped and nothing needs a timer. This module does not load or
//! judge manifests; the source does, and `/config` shows the failure's text.

use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use proxy_discovery::Discovery;

/// Exposes a [`Discovery`] handle's [`proxy_discovery::ReloadStatus`] on `/metrics`.
#[derive(Debug)]
pub struct DiscoveryCollector {
    pub discovery: Discovery,
}

fn seconds(since_epoch: Option<SystemTime>) -> f64 {
    since_epoch
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Collector for DiscoveryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let status = self.discovery.status();
        // A clock stepped back makes "age" negative; zero says "fresh" without lying
        // about the sign.
        let age = status
            .last_reload
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or(Duration::ZERO);
        let gauges: [(&str, &str, f64); 4] = [
            (
                "discovery_last_good_age_seconds",
                "Seconds since the serving discovery state was loaded (failed reloads do not reset it)",
                age.as_secs_f64(),
            ),
            (
                "discovery_last_good_load_timestamp_seconds",
                "Unix time at which the serving discovery state was loaded",
                seconds(status.last_reload),
            ),
            (
                "discovery_stale",
                "1 while the latest reload failed and an older state keeps serving, else 0",
                if status.stale { 1.0 } else { 0.0 },
            ),
            (
                "discovery_generation",
                "Discovery states published since start (the first load is 1)",
                // Exact below 2^53 publishes, far beyond any process lifetime.
                status.generation as f64,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        let failures = ConstCounter::new(status.failed_reloads);
        let metric = encoder.encode_descriptor(
            "discovery_reload_failures",
            "Discovery reloads that failed and were not published",
            None,
            failures.metric_type(),
        )?;
        failures.encode(metric)
    }
}
