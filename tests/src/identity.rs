//! Identities for the pods the end-to-end tests start: a fresh trust anchor, a
//! cluster issuer under it and one workload leaf, written where a sidecar reads them.
//!
//! [`Pki`] mints leaves of several clusters under one anchor, for the gateway
//! tests. Certificates are minted at test time with `proxy_identity::mint` and
//! never checked in. This module does not hand files to the proxy UID (see
//! [`crate::pod::prepare_dirs`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;
use isthmus_vocab::SpiffeId;
use proxy_identity::mint::{self, CertificateAuthority, KeyAlgorithm, LeafBundle, Validity};

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

/// One trust anchor and an issuer per cluster, as `isthmus identity` makes them,
/// valid for an hour from creation.
pub struct Pki {
    validity: Validity,
    anchor: CertificateAuthority,
    issuers: Mutex<HashMap<String, CertificateAuthority>>,
}

impl Pki {
    /// A new trust anchor named `anchor`.
    ///
    /// # Panics
    ///
    /// When minting fails (the crypto provider refuses the key algorithm).
    pub fn new(anchor: &str) -> Pki {
        let validity = Validity::from_now(Duration::from_secs(3600));
        let anchor = mint::trust_anchor(anchor, validity, KeyAlgorithm::EcdsaP256)
            .unwrap_or_else(|e| panic!("minting the trust anchor {anchor:?}: {e}"));
        Pki {
            validity,
            anchor,
            issuers: Mutex::default(),
        }
    }

    /// The trust anchor every issuer of this PKI chains to.
    pub fn anchor(&self) -> &CertificateAuthority {
        &self.anchor
    }

    /// A new leaf (new key, new serial) for `id` from `cluster`'s issuer, minted
    /// on first use.
    ///
    /// # Panics
    ///
    /// When minting fails, naming the cluster and the ID.
    pub fn leaf(&self, cluster: &str, id: &SpiffeId) -> LeafBundle {
        // A panic while holding the lock cannot leave the map half-written.
        let mut issuers = self
            .issuers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let issuer = issuers.entry(cluster.to_owned()).or_insert_with(|| {
            mint::issuer(
                &self.anchor,
                cluster,
                self.validity,
                KeyAlgorithm::EcdsaP256,
            )
            .unwrap_or_else(|e| panic!("minting the issuer of {cluster}: {e}"))
        });
        mint::leaf(issuer, id, self.validity, KeyAlgorithm::EcdsaP256)
            .unwrap_or_else(|e| panic!("minting a leaf for {id} in {cluster}: {e}"))
    }
}
