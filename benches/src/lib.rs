//! Fixtures shared by the benchmarks in `benches/`; the benchmarks themselves and the
//! load scripts live beside this crate, not in it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use isthmus_vocab::SpiffeId;
use proxy_identity::mint::{self, KeyAlgorithm, Validity};
use proxy_identity::{CredentialPaths, CredentialStore};

/// An in-memory identity for `id` under `issuer`: nothing is written, the store only
/// names the paths.
pub fn store(issuer: &mint::CertificateAuthority, id: &str) -> Arc<CredentialStore> {
    let id = SpiffeId::parse(id).expect("a valid SPIFFE ID");
    let bundle = mint::leaf(
        issuer,
        &id,
        Validity::from_now(Duration::from_secs(3600)),
        KeyAlgorithm::default(),
    )
    .expect("mint a leaf");
    let paths = CredentialPaths::in_dir("bench");
    let creds = bundle
        .credentials(&paths, SystemTime::now())
        .expect("fresh credentials are valid");
    Arc::new(CredentialStore::from_credentials(paths, creds))
}

/// The runtime the loopback benchmarks drive their servers and clients on: two
/// workers, as many as the machines they are quoted from have cores to spare.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// What each variant of a benchmark did (units: bytes, streams) and the time it
/// took, over criterion's warm-up and measurement both, for a summary that sets
/// every variant against a baseline measured in the same run.
pub struct Tally(Mutex<BTreeMap<&'static str, (u64, Duration)>>);

impl Tally {
    pub const fn new() -> Self {
        Self(Mutex::new(BTreeMap::new()))
    }

    /// Counts `units` done by `name` in `elapsed`.
    pub fn add(&self, name: &'static str, units: u64, elapsed: Duration) {
        let mut tally = self.0.lock().expect("tally lock");
        let entry = tally.entry(name).or_default();
        entry.0 += units;
        entry.1 += elapsed;
    }

    /// Prints `title`, then a line per variant (`line` of its name, its figure and
    /// the figure's ratio to `base`'s), where `figure` makes one number of a
    /// variant's units and time. Prints nothing when `base` has no figure.
    pub fn summary(
        &self,
        title: &str,
        base: &str,
        figure: impl Fn(u64, Duration) -> Option<f64>,
        line: impl Fn(&str, f64, f64) -> String,
    ) {
        let tally = self.0.lock().expect("tally lock");
        let of = |name: &str| {
            tally
                .get(name)
                .and_then(|&(units, time)| figure(units, time))
        };
        let Some(base) = of(base) else {
            return;
        };
        println!("\n{title}");
        for name in tally.keys() {
            if let Some(value) = of(name) {
                println!("  {}", line(name, value, value / base));
            }
        }
    }
}

impl Default for Tally {
    fn default() -> Self {
        Self::new()
    }
}
