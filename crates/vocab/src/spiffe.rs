//! SPIFFE IDs (`spiffe://<trust-domain>/<path>`) and trust domains, parsed strictly.
//!
//! The rules are those of the SPIFFE ID specification (section 2), as go-spiffe applies
//! them: a lowercase `spiffe` scheme, a trust domain of lowercase letters, digits, `.`,
//! `-` and `_` with no port or user info, and a path of non-empty segments of letters,
//! digits, `.`, `-` and `_` that are neither `.` nor `..`, with no query, fragment or
//! percent-encoding. Mesh workloads use the path `/ns/<namespace>/sa/<service-account>`,
//! which [`SpiffeId::workload`] builds and [`SpiffeId::namespace`] reads back; other
//! paths are valid IDs too (a gateway may be named otherwise).
//!
//! This module does not read certificates: the identity crate reads the URI SAN.

use std::fmt;
use std::str::FromStr;

/// The URI scheme and authority separator every SPIFFE ID starts with.
const PREFIX: &str = "spiffe://";

/// The specification's bound on a trust domain name, in bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// The specification's bound on a whole SPIFFE ID (a URI), in bytes.
const MAX_ID_LEN: usize = 2048;

/// Why a string is not a SPIFFE ID or trust domain. Each variant names the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The input is empty.
    #[error("empty SPIFFE ID")]
    Empty,
    /// The input does not start with `spiffe://`.
    #[error("{input:?}: scheme must be \"spiffe://\" (lowercase)")]
    Scheme {
        /// The rejected input.
        input: String,
    },
    /// Nothing between `spiffe://` and the path.
    #[error("{input:?}: trust domain is missing")]
    MissingTrustDomain {
        /// The rejected input.
        input: String,
    },
    /// A character outside `[a-z0-9._-]` in the trust domain.
    #[error(
        "{input:?}: trust domain character {ch:?} at byte {at} is not allowed \
         (only lowercase letters, digits, '.', '-' and '_'; no port, no user info)"
    )]
    TrustDomainChar {
        /// The rejected input.
        input: String,
        /// The offending character.
        ch: char,
        /// Its byte offset in the input.
        at: usize,
    },
    /// The trust domain is longer than 255 bytes.
    #[error("{input:?}: trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong {
        /// The rejected input.
        input: String,
    },
    /// A workload ID needs a path; `spiffe://example.org` names a trust domain only.
    #[error(
        "{input:?}: path is missing (a workload ID looks like spiffe://<trust-domain>/ns/<ns>/sa/<sa>)"
    )]
    MissingPath {
        /// The rejected input.
        input: String,
    },
    /// `//` inside the path, or a trailing `/`.
    #[error("{input:?}: path has an empty segment (\"//\" or a trailing '/')")]
    EmptySegment {
        /// The rejected input.
        input: String,
    },
    /// A `.` or `..` segment.
    #[error("{input:?}: path has a '.' or '..' segment")]
    DotSegment {
        /// The rejected input.
        input: String,
    },
    /// A character outside `[A-Za-z0-9._-]` in the path (this covers `?`, `#` and `%`).
    #[error(
        "{input:?}: path character {ch:?} at byte {at} is not allowed \
         (only letters, digits, '.', '-' and '_'; no query, fragment or percent-encoding)"
    )]
    PathChar {
        /// The rejected input.
        input: String,
        /// The offending character.
        ch: char,
        /// Its byte offset in the input.
        at: usize,
    },
    /// The whole ID is longer than 2048 bytes.
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes ({len} bytes)")]
    TooLong {
        /// The length of the input.
        len: usize,
    },
    /// A namespace or service account given to [`SpiffeId::workload`] is not a valid
    /// path segment.
    #[error("{field} {value:?} is not a valid SPIFFE path segment")]
    Segment {
        /// Which argument (`namespace` or `service account`).
        field: &'static str,
        /// Its value.
        value: String,
    },
}

/// A SPIFFE trust domain, such as `cluster.local` or `example.org`.
///
/// Both clusters of a mesh share one trust domain (and one trust anchor); the
/// cluster is told apart by the issuer, not by the name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses `example.org` or `spiffe://example.org` (the trust domain's own ID).
    pub fn parse(input: &str) -> Result<Self, IdError> {
        if input.is_empty() {
            return Err(IdError::Empty);
        }
        let (name, offset) = match input.strip_prefix(PREFIX) {
            Some(rest) => (rest, PREFIX.len()),
            None if input.contains("://") => {
                return Err(IdError::Scheme {
                    input: input.to_owned(),
                });
            }
            None => (input, 0),
        };
        check_trust_domain(input, name, offset)?;
        Ok(Self(name.to_owned()))
    }

    /// The name, without scheme.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://<name>`.
    pub fn id_string(&self) -> String {
        format!("{PREFIX}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A workload's SPIFFE ID: `spiffe://<trust-domain>/<path>` with a non-empty path.
///
/// Equality is byte equality of the canonical form: since parsing admits only
/// lowercase trust domains and unescaped paths, two equal identities have one spelling.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    /// Byte offset in `uri` where the path starts (the end of the trust domain).
    path_start: usize,
}

impl SpiffeId {
    /// Parses a SPIFFE ID strictly; the error says which rule the input breaks.
    pub fn parse(input: &str) -> Result<Self, IdError> {
        if input.is_empty() {
            return Err(IdError::Empty);
        }
        if input.len() > MAX_ID_LEN {
            return Err(IdError::TooLong { len: input.len() });
        }
        let Some(rest) = input.strip_prefix(PREFIX) else {
            return Err(IdError::Scheme {
                input: input.to_owned(),
            });
        };
        let td_len = rest.find('/').unwrap_or(rest.len());
        check_trust_domain(input, &rest[..td_len], PREFIX.len())?;
        let path_start = PREFIX.len() + td_len;
        let path = &input[path_start..];
        if path.is_empty() {
            return Err(IdError::MissingPath {
                input: input.to_owned(),
            });
        }
        check_path(input, path, path_start)?;
        Ok(Self {
            uri: input.to_owned(),
            path_start,
        })
    }

    /// The mesh's workload ID `spiffe://<td>/ns/<namespace>/sa/<service_account>`.
    pub fn workload(
        trust_domain: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdError> {
        for (field, value) in [
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            if !is_segment(value) {
                return Err(IdError::Segment {
                    field,
                    value: value.to_owned(),
                });
            }
        }
        Self::parse(&format!(
            "{PREFIX}{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// The whole ID, as carried in the certificate's URI SAN.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The trust domain's name.
    pub fn trust_domain_name(&self) -> &str {
        &self.uri[PREFIX.len()..self.path_start]
    }

    /// The trust domain, as an owned value.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// Whether this ID belongs to `trust_domain`.
    pub fn is_member_of(&self, trust_domain: &TrustDomain) -> bool {
        self.trust_domain_name() == trust_domain.as_str()
    }

    /// The namespace, when the path has the mesh's `/ns/<ns>/sa/<sa>` form.
    pub fn namespace(&self) -> Option<&str> {
        self.ns_sa().map(|(ns, _)| ns)
    }

    /// The service account, when the path has the mesh's `/ns/<ns>/sa/<sa>` form.
    pub fn service_account(&self) -> Option<&str> {
        self.ns_sa().map(|(_, sa)| sa)
    }

    fn ns_sa(&self) -> Option<(&str, &str)> {
        let mut segments = self.path().strip_prefix('/')?.split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = IdError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

/// `name` is the trust domain part of `input`, starting at byte `offset`.
fn check_trust_domain(input: &str, name: &str, offset: usize) -> Result<(), IdError> {
    if name.is_empty() {
        return Err(IdError::MissingTrustDomain {
            input: input.to_owned(),
        });
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong {
            input: input.to_owned(),
        });
    }
    if let Some((at, ch)) = name
        .char_indices()
        .find(|&(_, c)| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(IdError::TrustDomainChar {
            input: input.to_owned(),
            ch,
            at: offset + at,
        });
    }
    Ok(())
}

/// `path` is non-empty, starts with `/`, and starts at byte `offset` of `input`.
fn check_path(input: &str, path: &str, offset: usize) -> Result<(), IdError> {
    let mut seg_start = offset + 1;
    for segment in path[1..].split('/') {
        if segment.is_empty() {
            return Err(IdError::EmptySegment {
                input: input.to_owned(),
            });
        }
        if segment == "." || segment == ".." {
            return Err(IdError::DotSegment {
                input: input.to_owned(),
            });
        }
        if let Some((at, ch)) = segment.char_indices().find(|&(_, c)| !is_path_char(c)) {
            return Err(IdError::PathChar {
                input: input.to_owned(),
                ch,
                at: seg_start + at,
            });
        }
        seg_start += segment.len() + 1;
    }
    Ok(())
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

fn is_segment(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && s.chars().all(is_path_char)
}

#[cfg(test)]
mod tests;
