//! `isthmus identity trust-anchor | issuer | leaf`: minting the PEM directories that
//! the proxies mount (see `proxy_identity::mint` for what each directory holds).
//!
//! This module parses flags and reports; the certificates are made by
//! `proxy_identity::mint`, which also refuses what a CA cannot sign.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use isthmus_vocab::SpiffeId;
use proxy_identity::mint::{self, CertificateAuthority, KeyAlgorithm, Validity};

/// The `identity` subcommands.
#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// A new trust anchor (self-signed root): writes ca.crt and ca.key into --out.
    TrustAnchor(TrustAnchorArgs),
    /// A cluster's issuer (intermediate CA) under a trust anchor: writes ca.crt,
    /// ca.key, chain.crt and anchors.crt into --out. It names its cluster (OU=<cluster>)
    /// and signs leaves only; every leaf it signs belongs to that cluster.
    Issuer(IssuerArgs),
    /// A workload's certificate: writes tls.crt (leaf and chain), tls.key and ca.crt
    /// (trust anchors) into --out, the layout a pod mounts.
    Leaf(LeafArgs),
}

/// Flags every minting command takes.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// Key type of the new certificate: ecdsa-p256, ecdsa-p384 or ed25519.
    #[arg(long, env = "ISTHMUS_KEY_ALG", default_value = "ecdsa-p256", value_parser = parse_key_alg)]
    key_alg: KeyAlgorithm,
    /// Overwrite files that already exist in --out.
    #[arg(long)]
    force: bool,
}

/// `isthmus identity trust-anchor`.
#[derive(Debug, Args)]
pub struct TrustAnchorArgs {
    /// Directory to write ca.crt and ca.key into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Common name of the anchor [default: "isthmus trust anchor <random hex>"].
    #[arg(long)]
    name: Option<String>,
    /// Lifetime, as a number and a unit among s, m, h, d.
    #[arg(long, value_name = "DURATION", default_value = "365d", value_parser = parse_lifetime)]
    valid_for: Duration,
    #[command(flatten)]
    key: KeyArgs,
}

/// `isthmus identity issuer`.
#[derive(Debug, Args)]
pub struct IssuerArgs {
    /// The trust anchor's directory (ca.crt, ca.key).
    #[arg(long, value_name = "DIR", env = "ISTHMUS_ANCHOR_DIR")]
    anchor: PathBuf,
    /// The cluster this issuer signs for (a DNS label, e.g. cluster-a), written into
    /// its certificate: proxies give its leaves the rights of that cluster only.
    #[arg(long, value_name = "NAME", env = "ISTHMUS_CLUSTER")]
    cluster: String,
    /// Directory to write the issuer into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Lifetime, as a number and a unit among s, m, h, d.
    #[arg(long, value_name = "DURATION", default_value = "28d", value_parser = parse_lifetime)]
    valid_for: Duration,
    #[command(flatten)]
    key: KeyArgs,
}

/// `isthmus identity leaf`.
#[derive(Debug, Args)]
pub struct LeafArgs {
    /// The issuer's directory (from `isthmus identity issuer`; a trust anchor signs
    /// issuers only).
    #[arg(long, value_name = "DIR", env = "ISTHMUS_ISSUER_DIR")]
    issuer: PathBuf,
    /// The workload's SPIFFE ID, spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
    #[arg(long, value_name = "SPIFFE_ID", value_parser = parse_id)]
    id: SpiffeId,
    /// Directory to write tls.crt, tls.key and ca.crt into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Lifetime, as a number and a unit among s, m, h, d.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_lifetime)]
    valid_for: Duration,
    #[command(flatten)]
    key: KeyArgs,
}

/// Runs one `identity` subcommand, reporting the files written on stdout.
pub fn run(command: IdentityCommand) -> Result<()> {
    match command {
        IdentityCommand::TrustAnchor(args) => {
            let name = args.name.unwrap_or_else(mint::default_anchor_name);
            let validity = Validity::from_now(args.valid_for);
            let anchor = mint::trust_anchor(&name, validity, args.key.key_alg)
                .with_context(|| format!("minting trust anchor {name:?}"))?;
            let files = anchor
                .write_dir(&args.out, args.key.force)
                .with_context(|| {
                    format!("writing the trust anchor into --out {}", args.out.display())
                })?;
            report(&format!("trust anchor {name:?}"), validity, &files);
        }
        IdentityCommand::Issuer(args) => {
            let anchor = read_authority(&args.anchor, "--anchor")?;
            let validity = Validity::from_now(args.valid_for);
            let issuer = mint::issuer(&anchor, &args.cluster, validity, args.key.key_alg)
                .with_context(|| {
                    format!(
                        "minting the issuer of cluster {:?} under --anchor {}",
                        args.cluster,
                        args.anchor.display()
                    )
                })?;
            let files = issuer
                .write_dir(&args.out, args.key.force)
                .with_context(|| format!("writing the issuer into --out {}", args.out.display()))?;
            report(
                &format!(
                    "issuer of cluster {} (its leaves belong to cluster {})",
                    args.cluster, args.cluster
                ),
                validity,
                &files,
            );
        }
        IdentityCommand::Leaf(args) => {
            let issuer = read_authority(&args.issuer, "--issuer")?;
            let validity = Validity::from_now(args.valid_for);
            let leaf =
                mint::leaf(&issuer, &args.id, validity, args.key.key_alg).with_context(|| {
                    format!(
                        "minting the leaf of {} with --issuer {}",
                        args.id,
                        args.issuer.display()
                    )
                })?;
            let files = leaf
                .write_dir(&args.out, args.key.force)
                .with_context(|| format!("writing the leaf into --out {}", args.out.display()))?;
            let of = issuer
                .cluster()
                .map_or_else(String::new, |c| format!(" of cluster {c}"));
            report(&format!("leaf {}{of}", args.id), validity, &files);
        }
    }
    Ok(())
}

fn read_authority(dir: &Path, flag: &str) -> Result<CertificateAuthority> {
    CertificateAuthority::read_dir(dir).with_context(|| format!("reading {flag} {}", dir.display()))
}

fn report(what: &str, validity: Validity, files: &[PathBuf]) {
    println!(
        "minted {what}, valid until {}",
        proxy_identity::format_rfc3339(validity.not_after)
    );
    for file in files {
        println!("  {}", file.display());
    }
}

fn parse_id(s: &str) -> Result<SpiffeId, String> {
    SpiffeId::parse(s).map_err(|e| e.to_string())
}

fn parse_key_alg(s: &str) -> Result<KeyAlgorithm, String> {
    s.parse().map_err(|e: mint::MintError| e.to_string())
}

/// `90s`, `30m`, `24h`, `28d`: a positive whole number and one unit.
fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{s:?} needs a unit among s, m, h, d (e.g. 24h, 28d)"
            ));
        }
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} does not start with a whole number"))?;
    if n == 0 {
        return Err(format!("{s:?} is not a positive lifetime"));
    }
    n.checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes() {
        assert_eq!(parse_lifetime("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_lifetime("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_lifetime("28d"), Ok(Duration::from_secs(28 * 86_400)));
        for bad in [
            "",
            "24",
            "h",
            "0h",
            "1.5h",
            "-1d",
            "1w",
            "99999999999999999999d",
        ] {
            assert!(parse_lifetime(bad).is_err(), "{bad:?}");
        }
    }
}
