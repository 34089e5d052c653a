//! Identities for the pods the end-to-end tests start: a fresh trust anchor, a
//! cluster issuer under it and one workload leaf, written where a sidecar reads them.
//!
//! [`Pki`] (from the test-support crate) mints leaves of several clusters under one
//! anchor, for the gateway tests. Certificates are minted at test time with `proxy_identity::mint` and
//! never checked in. This module does not hand files to the proxy UID (see
//! [`crate::pod::prepare_dirs`]).

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use isthmus_vocab::SpiffeId;
use proxy_identity::mint::{self, CertificateAuthority, KeyAlgorithm, Validity};

/// The cluster every pod identity is issued for.
pub const CLUSTER: &str = "cluster-b";

/// Writes a leaf for `id` (a SPIFFE ID such as
/// `spiffe://cluster.local/ns/default/sa/client`), issued for [`CLUSTER`] under a
/// new anchor named `anchor`, into `dir` (created; `tls.crt`, `tls.key`,
/// `ca.crt`). Returns the issuer, for tests that mint more leaves under it.
pub fn mint_leaf(
    dir: &Path,
    anchor: &str,
    id: &str,
    validity: Validity,
) -> anyhow::Result<CertificateAuthority> {
    let anchor = mint::trust_anchor(anchor, validity, KeyAlgorithm::EcdsaP256)
        .with_context(|| format!("minting the trust anchor {anchor:?}"))?;
    let issuer = mint::issuer(&anchor, CLUSTER, validity, KeyAlgorithm::EcdsaP256)
        .with_context(|| format!("minting the issuer for {CLUSTER}"))?;
    let spiffe = SpiffeId::parse(id).with_context(|| format!("parsing the SPIFFE ID {id:?}"))?;
    mint::leaf(&issuer, &spiffe, validity, KeyAlgorithm::EcdsaP256)
        .with_context(|| format!("minting the leaf for {id}"))?
        .write_dir(dir, false)
        .with_context(|| format!("writing the identity of {id} to {}", dir.display()))?;
    Ok(issuer)
}

/// [`mint_leaf`] valid for an hour, for `sa/client` in `default`: the identity of
/// the client pod in the fault and load tests.
pub fn mint_pod(dir: &Path, anchor: &str) -> anyhow::Result<()> {
    mint_leaf(
        dir,
        anchor,
        "spiffe://cluster.local/ns/default/sa/client",
        Validity::from_now(Duration::from_secs(3600)),
    )
    .map(drop)
}

/// One trust anchor and an issuer per cluster, as `isthmus identity` makes them.
pub use isthmus_test_support::Pki;

/// What [`crate::pod::SidecarPod::start`] calls to write the pod's identity:
/// `sa/frontend` in `default` of [`CLUSTER`], under `pki` (whose other leaves are
/// the gateways the pod's sidecar dials).
///
/// # Panics
///
/// When the leaf cannot be written.
pub fn frontend_of(pki: &Pki) -> impl FnOnce(&Path) + '_ {
    move |dir| {
        let frontend = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/frontend")
            .unwrap_or_else(|e| panic!("the frontend's SPIFFE ID: {e}"));
        pki.leaf(CLUSTER, &frontend)
            .write_dir(dir, false)
            .unwrap_or_else(|e| {
                panic!("writing the frontend's identity to {}: {e}", dir.display())
            });
    }
}
