//! Fixtures shared by the benchmarks in `benches/`; the benchmarks themselves and the
//! load scripts live beside this crate, not in it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use isthmus_vocab::SpiffeId;
use proxy_identity::mint::{self, KeyAlgorithm, Validity};
use proxy_identity::{CredentialPaths, CredentialStore, Credentials};

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
    let creds = Credentials::from_pem(
        &paths,
        bundle.cert_chain_pem.as_bytes(),
        bundle.key_pem.as_bytes(),
        bundle.anchors_pem.as_bytes(),
        SystemTime::now(),
    )
    .expect("fresh credentials are valid");
    Arc::new(CredentialStore::from_credentials(paths, creds))
}
