//! Minting the mesh's certificates with rcgen: one trust anchor, an issuer (an
//! intermediate CA) per cluster under it, and workload leaves named by SPIFFE ID.
//!
//! For tooling (`isthmus identity`), tests and the lab. Production meshes would have
//! cert-manager or SPIRE mint leaves; this module only has to produce what they produce.
//!
//! # Directories
//!
//! | directory | files |
//! | --- | --- |
//! | trust anchor | `ca.crt` (the self-signed anchor), `ca.key` |
//! | issuer | `ca.crt` (the issuer's certificate), `ca.key`, `chain.crt` (what leaves append after themselves in `tls.crt`: the issuer's certificate), `anchors.crt` (the trust anchors leaves get as `ca.crt`) |
//! | leaf | `tls.crt` (leaf, then the issuer's chain), `tls.key`, `ca.crt` (the anchors) |
//!
//! All PEM; private keys PKCS#8, written mode 0600, certificates 0644. Each file is
//! written to a temporary name and renamed, so a proxy watching a leaf directory sees
//! each file either old or new, never half-written.
//!
//! Certificates follow the X509-SVID profile: the leaf has exactly one URI SAN (its
//! SPIFFE ID), CA:FALSE, digitalSignature, and both serverAuth and clientAuth (a proxy
//! is server and client); signing certificates have CA:TRUE and keyCertSign. Every
//! certificate gets a random serial, a subject key identifier and the authority key
//! identifier of the key that signed it.
//!
//! # What each CA signs
//!
//! - The trust anchor signs issuers only: [`leaf`] refuses an anchor.
//! - An issuer signs the leaves of its one cluster. It names that cluster in its subject
//!   (`OU=<cluster>`, the one organizationalUnitName, read by [`crate::cluster`]) and has
//!   a path length of 0, so webpki refuses any CA it signs. Its leaves belong to its
//!   cluster whatever SPIFFE ID they carry; see [`crate::cluster`] for why there is no
//!   URI name constraint.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use isthmus_vocab::cluster::is_dns_label;
use isthmus_vocab::{ClusterName, SpiffeId};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};

use crate::tls::crypto_provider;

/// Default lifetime of a trust anchor: a year.
pub const DEFAULT_ANCHOR_LIFETIME: Duration = Duration::from_secs(365 * 86_400);
/// Default lifetime of a cluster's issuer: four weeks.
pub const DEFAULT_ISSUER_LIFETIME: Duration = Duration::from_secs(28 * 86_400);
/// Default lifetime of a workload leaf: a day, as cert-manager's CSI driver defaults to.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(86_400);
/// How far back notBefore is set, so a peer whose clock lags a little accepts a
/// certificate minted a moment ago.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// The file names of the directories this module writes and reads.
pub mod files {
    /// A CA's certificate (anchor or issuer).
    pub const CA_CERT: &str = "ca.crt";
    /// A CA's private key.
    pub const CA_KEY: &str = "ca.key";
    /// An issuer's chain, appended to its leaves' `tls.crt`.
    pub const CHAIN: &str = "chain.crt";
    /// An issuer's trust anchors, its leaves' `ca.crt`.
    pub const ANCHORS: &str = "anchors.crt";
}

/// The key type of a new certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// ECDSA over P-256 with SHA-256: the default, what every TLS stack accepts.
    #[default]
    EcdsaP256,
    /// ECDSA over P-384 with SHA-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
}

impl KeyAlgorithm {
    fn rcgen(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Self::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }

    /// The names [`FromStr`] accepts.
    pub const NAMES: [&'static str; 3] = ["ecdsa-p256", "ecdsa-p384", "ed25519"];
}

impl FromStr for KeyAlgorithm {
    type Err = MintError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ecdsa-p256" => Ok(Self::EcdsaP256),
            "ecdsa-p384" => Ok(Self::EcdsaP384),
            "ed25519" => Ok(Self::Ed25519),
            other => Err(MintError::KeyAlgorithm {
                name: other.to_owned(),
            }),
        }
    }
}

/// A certificate's validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// notBefore.
    pub not_before: SystemTime,
    /// notAfter.
    pub not_after: SystemTime,
}

impl Validity {
    /// From [`CLOCK_SKEW_ALLOWANCE`] ago until `lifetime` from now.
    pub fn from_now(lifetime: Duration) -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now - CLOCK_SKEW_ALLOWANCE,
            not_after: now + lifetime,
        }
    }
}

/// Why minting failed.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// Unknown `--key-alg` name.
    #[error("unknown key algorithm {name:?} (expected one of ecdsa-p256, ecdsa-p384, ed25519)")]
    KeyAlgorithm {
        /// The name given.
        name: String,
    },
    /// notAfter not after notBefore.
    #[error("validity ends before it starts")]
    EmptyValidity,
    /// A cluster name that is not a DNS label.
    #[error(
        "cluster name {name:?} is not a DNS label (1-63 of a-z, 0-9, '-', not starting or ending with '-')"
    )]
    ClusterName {
        /// The name given.
        name: String,
    },
    /// rcgen refused.
    #[error("cannot {what}")]
    Rcgen {
        /// What was being done.
        what: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// The signing CA cannot sign this certificate.
    #[error("signing CA {subject}: {problem}")]
    CertificateAuthority {
        /// The CA's subject.
        subject: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A file could not be read or written.
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file holds what it should not.
    #[error("{}: {problem}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Refusing to overwrite without being asked to.
    #[error("{} already exists (pass --force to overwrite)", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
}

fn rcgen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> MintError {
    move |source| MintError::Rcgen { what, source }
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct Minted {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[elided]")
            .finish()
    }
}

/// A CA that signs: the trust anchor, or a cluster's issuer.
#[derive(Debug, Clone)]
pub struct CertificateAuthority {
    /// Its own certificate and key.
    pub ca: Minted,
    /// The certificates leaves append after themselves: empty for an anchor, the
    /// issuer's certificate for an issuer.
    pub chain_pem: String,
    /// The trust anchors (PEM bundle) leaves are told to trust.
    pub anchors_pem: String,
}

/// A workload's credentials, as a pod gets them mounted.
#[derive(Debug, Clone)]
pub struct LeafBundle {
    /// The SPIFFE ID of the leaf.
    pub id: SpiffeId,
    /// `tls.crt`: the leaf, then the chain.
    pub cert_chain_pem: String,
    /// `tls.key`.
    pub key_pem: String,
    /// `ca.crt`: the trust anchors.
    pub anchors_pem: String,
}

/// A CN for a new anchor, `isthmus trust anchor <8 random hex digits>`.
///
/// Anchors need distinct names: a verifier looks a chain's issuer up by name, so a
/// foreign anchor of the same name as ours turns "unknown issuer" into the less
/// telling "bad signature".
pub fn default_anchor_name() -> String {
    let serial = random_serial().to_bytes();
    let suffix: String = serial[12..].iter().map(|b| format!("{b:02x}")).collect();
    format!("isthmus trust anchor {suffix}")
}

/// A new self-signed trust anchor named `name` (its CN).
pub fn trust_anchor(
    name: &str,
    validity: Validity,
    algorithm: KeyAlgorithm,
) -> Result<CertificateAuthority, MintError> {
    let mut params = base_params(validity)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = new_key(algorithm)?;
    let cert = params
        .self_signed(&key)
        .map_err(rcgen_err("self-sign the trust anchor"))?;
    let cert_pem = cert.pem();
    Ok(CertificateAuthority {
        anchors_pem: cert_pem.clone(),
        ca: Minted {
            cert_pem,
            key_pem: key.serialize_pem(),
        },
        chain_pem: String::new(),
    })
}

/// A new issuer for `cluster`, signed by the trust `anchor`: it names `cluster` in
/// its subject (`OU=<cluster>`) and signs leaves only (path length 0).
pub fn issuer(
    anchor: &CertificateAuthority,
    cluster: &str,
    validity: Validity,
    algorithm: KeyAlgorithm,
) -> Result<CertificateAuthority, MintError> {
    if !is_dns_label(cluster) {
        return Err(MintError::ClusterName {
            name: cluster.to_owned(),
        });
    }
    let signer = Signer::new(anchor)?;
    if !anchor.is_anchor() {
        return Err(signer.problem(
            "is an issuer, not a trust anchor (issuers have path length 0 and sign leaves only)",
        ));
    }
    let mut params = base_params(validity)?;
    params.distinguished_name = issuer_name(cluster);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = new_key(algorithm)?;
    let cert_pem = signer.sign(&params, &key, validity)?;
    Ok(CertificateAuthority {
        chain_pem: format!("{cert_pem}{}", anchor.chain_pem),
        ca: Minted {
            cert_pem,
            key_pem: key.serialize_pem(),
        },
        anchors_pem: anchor.anchors_pem.clone(),
    })
}

/// A new leaf for `id`, signed by a cluster's `issuer`. A trust anchor is refused: a
/// leaf it signed would belong to no cluster.
pub fn leaf(
    issuer: &CertificateAuthority,
    id: &SpiffeId,
    validity: Validity,
    algorithm: KeyAlgorithm,
) -> Result<LeafBundle, MintError> {
    let signer = Signer::new(issuer)?;
    if issuer.is_anchor() {
        return Err(signer.problem(
            "is a trust anchor, which signs issuers only; mint the cluster's issuer \
             (isthmus identity issuer --anchor DIR --cluster NAME --out DIR) and sign with it",
        ));
    }
    let mut params = base_params(validity)?;
    // CN is bounded to 64 characters by X.509; the SAN is what names the workload.
    if id.path().len() <= 64 {
        params
            .distinguished_name
            .push(DnType::CommonName, id.path());
    }
    params.subject_alt_names = vec![SanType::URI(
        id.as_str()
            .try_into()
            .map_err(rcgen_err("encode the SPIFFE ID as a URI SAN"))?,
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = new_key(algorithm)?;
    let cert_pem = signer.sign(&params, &key, validity)?;
    Ok(LeafBundle {
        id: id.clone(),
        cert_chain_pem: format!("{cert_pem}{}", issuer.chain_pem),
        key_pem: key.serialize_pem(),
        anchors_pem: issuer.anchors_pem.clone(),
    })
}

impl CertificateAuthority {
    /// Whether this is a self-signed trust anchor (rather than an issuer under one).
    pub fn is_anchor(&self) -> bool {
        self.chain_pem.is_empty()
    }

    /// The cluster an issuer names (see [`crate::cluster`]); `None` for an anchor or
    /// an issuer that names none.
    pub fn cluster(&self) -> Option<ClusterName> {
        if self.is_anchor() {
            return None;
        }
        let der = first_cert_der(Path::new(files::CA_CERT), &self.ca.cert_pem).ok()?;
        crate::cluster::issuer_cluster(&der)
    }

    /// Writes the directory (see the module docs); returns the files written.
    pub fn write_dir(&self, dir: &Path, overwrite: bool) -> Result<Vec<PathBuf>, MintError> {
        let mut out = vec![
            (files::CA_CERT, self.ca.cert_pem.as_str(), CERT_MODE),
            (files::CA_KEY, self.ca.key_pem.as_str(), KEY_MODE),
        ];
        if !self.is_anchor() {
            out.push((files::CHAIN, self.chain_pem.as_str(), CERT_MODE));
            out.push((files::ANCHORS, self.anchors_pem.as_str(), CERT_MODE));
        }
        write_files(dir, &out, overwrite)
    }

    /// Reads an anchor or issuer directory written by [`Self::write_dir`]. A directory
    /// with `anchors.crt` is an issuer; without, `ca.crt` must be self-signed.
    pub fn read_dir(dir: &Path) -> Result<Self, MintError> {
        let ca = Minted {
            cert_pem: read_text(&dir.join(files::CA_CERT))?,
            key_pem: read_text(&dir.join(files::CA_KEY))?,
        };
        let anchors_path = dir.join(files::ANCHORS);
        if anchors_path.exists() {
            return Ok(Self {
                ca,
                chain_pem: read_text(&dir.join(files::CHAIN))?,
                anchors_pem: read_text(&anchors_path)?,
            });
        }
        let cert_path = dir.join(files::CA_CERT);
        let der = first_cert_der(&cert_path, &ca.cert_pem)?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der).map_err(|e| MintError::File {
            path: cert_path.clone(),
            problem: format!("not parsable X.509: {e}"),
        })?;
        if x509.subject() != x509.issuer() {
            return Err(MintError::File {
                path: cert_path,
                problem: format!(
                    "is not self-signed and {} has no {}: neither a trust anchor nor an issuer directory",
                    dir.display(),
                    files::ANCHORS
                ),
            });
        }
        Ok(Self {
            anchors_pem: ca.cert_pem.clone(),
            ca,
            chain_pem: String::new(),
        })
    }
}

impl LeafBundle {
    /// Writes `tls.crt`, `tls.key` and `ca.crt` into `dir`; returns the files written.
    pub fn write_dir(&self, dir: &Path, overwrite: bool) -> Result<Vec<PathBuf>, MintError> {
        write_files(
            dir,
            &[
                (crate::creds::CERT_FILE, &self.cert_chain_pem, CERT_MODE),
                (crate::creds::KEY_FILE, &self.key_pem, KEY_MODE),
                (crate::creds::ANCHORS_FILE, &self.anchors_pem, CERT_MODE),
            ],
            overwrite,
        )
    }

    /// The bundle validated as the proxy validates what it loads, at `now`, without
    /// touching files: `paths` only name the files in errors.
    pub fn credentials(
        &self,
        paths: &crate::CredentialPaths,
        now: SystemTime,
    ) -> Result<crate::Credentials, crate::CredsError> {
        crate::Credentials::from_pem(
            paths,
            self.cert_chain_pem.as_bytes(),
            self.key_pem.as_bytes(),
            self.anchors_pem.as_bytes(),
            now,
        )
    }
}

const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;

/// A parsed CA, checked able to sign.
struct Signer {
    issuer: Issuer<'static, KeyPair>,
    subject: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Signer {
    fn new(ca: &CertificateAuthority) -> Result<Self, MintError> {
        let der = first_cert_der(Path::new(files::CA_CERT), &ca.ca.cert_pem)?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der).map_err(|e| {
            MintError::CertificateAuthority {
                subject: "?".into(),
                problem: format!("certificate is not parsable X.509: {e}"),
            }
        })?;
        let subject = x509.subject().to_string();
        let problem = |problem: &str| MintError::CertificateAuthority {
            subject: subject.clone(),
            problem: problem.to_owned(),
        };
        if !x509.is_ca() {
            return Err(problem(
                "is not a CA certificate (basicConstraints CA:FALSE)",
            ));
        }
        let key = KeyPair::from_pem(&ca.ca.key_pem).map_err(rcgen_err("parse the CA key"))?;
        if key.subject_public_key_info() != x509.public_key().raw {
            return Err(problem("its private key does not match its certificate"));
        }
        let validity = x509.validity();
        let not_before = UNIX_EPOCH
            + Duration::from_secs(u64::try_from(validity.not_before.timestamp()).unwrap_or(0));
        let not_after = UNIX_EPOCH
            + Duration::from_secs(u64::try_from(validity.not_after.timestamp()).unwrap_or(0));
        if SystemTime::now() > not_after {
            return Err(problem(&format!(
                "expired at {}",
                crate::rfc3339::format(not_after)
            )));
        }
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(rcgen_err("read the CA"))?;
        Ok(Self {
            issuer,
            subject,
            not_before,
            not_after,
        })
    }

    fn problem(&self, problem: &str) -> MintError {
        MintError::CertificateAuthority {
            subject: self.subject.clone(),
            problem: problem.to_owned(),
        }
    }

    fn sign(
        &self,
        params: &CertificateParams,
        key: &KeyPair,
        validity: Validity,
    ) -> Result<String, MintError> {
        // A certificate outliving its CA would fail verification in its last days
        // anyway; better to say so now than to hand out a time bomb.
        // Certificates hold whole seconds; compare at that precision.
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if secs(validity.not_after) > secs(self.not_after) {
            return Err(self.problem(&format!(
                "expires at {}, before the requested notAfter {}; shorten the validity or mint a new CA",
                crate::rfc3339::format(self.not_after),
                crate::rfc3339::format(validity.not_after)
            )));
        }
        if secs(validity.not_before) < secs(self.not_before) {
            return Err(self.problem(&format!(
                "is valid only from {}, after the requested notBefore {}",
                crate::rfc3339::format(self.not_before),
                crate::rfc3339::format(validity.not_before)
            )));
        }
        let cert = params
            .signed_by(key, &self.issuer)
            .map_err(rcgen_err("sign the certificate"))?;
        Ok(cert.pem())
    }
}

/// The subject of `cluster`'s issuer: `O=isthmus, CN=isthmus issuer <cluster>,
/// OU=<cluster>`, the OU naming the cluster ([`crate::cluster`] reads it).
pub fn issuer_name(cluster: &str) -> rcgen::DistinguishedName {
    let mut name = rcgen::DistinguishedName::new();
    name.push(DnType::OrganizationName, "isthmus");
    name.push(DnType::CommonName, format!("isthmus issuer {cluster}"));
    name.push(DnType::OrganizationalUnitName, cluster);
    name
}

fn base_params(validity: Validity) -> Result<CertificateParams, MintError> {
    if validity.not_after <= validity.not_before {
        return Err(MintError::EmptyValidity);
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "isthmus");
    set_validity(&mut params, validity)?;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn set_validity(params: &mut CertificateParams, validity: Validity) -> Result<(), MintError> {
    // rcgen takes `time::OffsetDateTime`; x509-parser's ASN1Time converts without this
    // crate depending on `time` directly.
    let convert = |t: SystemTime| {
        let secs = t
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| i64::try_from(d.as_secs()).ok())
            .ok_or(MintError::EmptyValidity)?;
        x509_parser::time::ASN1Time::from_timestamp(secs)
            .map(|t| t.to_datetime())
            .map_err(|_| MintError::EmptyValidity)
    };
    params.not_before = convert(validity.not_before)?;
    params.not_after = convert(validity.not_after)?;
    Ok(())
}

/// 16 random bytes, the top bit cleared so the DER integer stays positive and short.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // ring's SystemRandom fails only if the OS has no entropy source at all, in which
    // case no key could be generated either.
    crypto_provider()
        .secure_random
        .fill(&mut bytes)
        .expect("the OS random source is available");
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn new_key(algorithm: KeyAlgorithm) -> Result<KeyPair, MintError> {
    KeyPair::generate_for(algorithm.rcgen()).map_err(rcgen_err("generate a key pair"))
}

fn read_text(path: &Path) -> Result<String, MintError> {
    fs::read_to_string(path).map_err(|source| MintError::Io {
        path: path.to_owned(),
        source,
    })
}

fn first_cert_der(
    path: &Path,
    pem: &str,
) -> Result<rustls_pki_types::CertificateDer<'static>, MintError> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| MintError::File {
        path: path.to_owned(),
        problem: format!("holds no usable CERTIFICATE block: {e}"),
    })
}

/// Writes every file or none: existing targets are refused up front unless
/// `overwrite`; each file goes to a temporary name first and is renamed into place.
fn write_files(
    dir: &Path,
    out: &[(&str, &str, u32)],
    overwrite: bool,
) -> Result<Vec<PathBuf>, MintError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| MintError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    if !overwrite {
        for (name, _, _) in out {
            let path = dir.join(name);
            if path.exists() {
                return Err(MintError::Exists { path });
            }
        }
    }
    let mut written = Vec::with_capacity(out.len());
    for (name, contents, mode) in out {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(*mode)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        // `mode` applies only on creation; a stale temporary file keeps its own.
        file.set_permissions(fs::Permissions::from_mode(*mode))
            .map_err(io_err(&tmp))?;
        file.write_all(contents.as_bytes()).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests;
