//! A mirrored Service's request policy: its timeouts and retries, set by annotations
//! on the ServiceMirror or the Service, named after Linkerd's (`timeout.linkerd.io/*`,
//! `retry.linkerd.io/*`) in the mesh's own `isthmus.io` namespace.
//!
//! Discovery reads the annotations into a [`ServicePolicy`]; the sidecar applies it
//! to each HTTP request it carries to the Service. The defaults are the safe ones:
//! no timeout the application did not ask for, and only retries that cannot repeat
//! an effect (a request no endpoint saw, or an idempotent one).

use std::time::Duration;

/// Deadline from a request's start to its response head; past it the client gets
/// `504` and the request's stream is reset.
pub const REQUEST_TIMEOUT_ANNOTATION: &str = "timeout.isthmus.io/request";
/// Deadline from a request's start to its response's end; past it the response is
/// cut (a reset), or answered `504` if its head has not come yet.
pub const RESPONSE_TIMEOUT_ANNOTATION: &str = "timeout.isthmus.io/response";
/// Retries of one request after its first attempt (`0` turns retries off).
pub const RETRY_LIMIT_ANNOTATION: &str = "retry.isthmus.io/limit";
/// Deadline of each attempt to the response head; an attempt past it is reset and
/// retried, within the request's own deadline.
pub const RETRY_TIMEOUT_ANNOTATION: &str = "retry.isthmus.io/timeout";
/// Response statuses retried like a failure: a comma-separated list of `5xx`,
/// `gateway-error` (502, 503, 504), a status (`503`) or a range (`500-504`).
pub const RETRY_HTTP_ANNOTATION: &str = "retry.isthmus.io/http";
/// `"true"`: every request of the Service may be retried, whatever its method (the
/// Service declares its non-idempotent methods safe to repeat).
pub const RETRY_ANY_METHOD_ANNOTATION: &str = "retry.isthmus.io/any-method";

/// Every policy annotation, for whoever copies or reports them.
pub const POLICY_ANNOTATIONS: [&str; 6] = [
    REQUEST_TIMEOUT_ANNOTATION,
    RESPONSE_TIMEOUT_ANNOTATION,
    RETRY_LIMIT_ANNOTATION,
    RETRY_TIMEOUT_ANNOTATION,
    RETRY_HTTP_ANNOTATION,
    RETRY_ANY_METHOD_ANNOTATION,
];

/// Default [`ServicePolicy::retry_limit`]: two retries, three attempts in all.
pub const DEFAULT_RETRY_LIMIT: u32 = 2;

/// One Service's timeouts and retries. [`Default`] is the policy of a Service that
/// sets none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePolicy {
    /// See [`REQUEST_TIMEOUT_ANNOTATION`]; `None`: no deadline.
    pub request_timeout: Option<Duration>,
    /// See [`RESPONSE_TIMEOUT_ANNOTATION`]; `None`: no deadline.
    pub response_timeout: Option<Duration>,
    /// See [`RETRY_LIMIT_ANNOTATION`].
    pub retry_limit: u32,
    /// See [`RETRY_TIMEOUT_ANNOTATION`]; `None`: an attempt runs to the request's
    /// own deadline.
    pub retry_timeout: Option<Duration>,
    /// See [`RETRY_HTTP_ANNOTATION`]; empty: no response is retried.
    pub retry_statuses: Vec<StatusRange>,
    /// See [`RETRY_ANY_METHOD_ANNOTATION`].
    pub retry_any_method: bool,
}

impl Default for ServicePolicy {
    fn default() -> Self {
        Self {
            request_timeout: None,
            response_timeout: None,
            retry_limit: DEFAULT_RETRY_LIMIT,
            retry_timeout: None,
            retry_statuses: Vec::new(),
            retry_any_method: false,
        }
    }
}

impl ServicePolicy {
    /// Whether a response with `status` is retried like a failure.
    pub fn retries_status(&self, status: u16) -> bool {
        self.retry_statuses.iter().any(|r| r.contains(status))
    }
}

/// An inclusive range of HTTP statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusRange {
    pub first: u16,
    pub last: u16,
}

impl StatusRange {
    pub fn contains(self, status: u16) -> bool {
        (self.first..=self.last).contains(&status)
    }

    /// Parses one item of [`RETRY_HTTP_ANNOTATION`]'s list.
    pub fn parse(item: &str) -> Result<Vec<StatusRange>, StatusRangeError> {
        let item = item.trim();
        let range = |first, last| vec![StatusRange { first, last }];
        match item {
            "5xx" => return Ok(range(500, 599)),
            "gateway-error" => return Ok(range(502, 504)),
            _ => {}
        }
        let status = |s: &str| {
            s.trim()
                .parse::<u16>()
                .ok()
                .filter(|n| (100..=599).contains(n))
                .ok_or_else(|| StatusRangeError(item.to_owned()))
        };
        match item.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (status(first)?, status(last)?);
                if first > last {
                    return Err(StatusRangeError(item.to_owned()));
                }
                Ok(range(first, last))
            }
            None => {
                let only = status(item)?;
                Ok(range(only, only))
            }
        }
    }

    /// Parses [`RETRY_HTTP_ANNOTATION`]'s whole list.
    pub fn parse_list(list: &str) -> Result<Vec<StatusRange>, StatusRangeError> {
        let mut ranges = Vec::new();
        for item in list.split(',').filter(|i| !i.trim().is_empty()) {
            ranges.extend(StatusRange::parse(item)?);
        }
        Ok(ranges)
    }
}

impl std::fmt::Display for StatusRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A [`RETRY_HTTP_ANNOTATION`] item that is none of its forms.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not a status class (5xx, gateway-error), a status (503) or a range (500-504) of statuses 100-599"
)]
pub struct StatusRangeError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lists_read_classes_codes_and_ranges() {
        let ranges = StatusRange::parse_list("gateway-error, 429 ,500-501").unwrap();
        let policy = ServicePolicy {
            retry_statuses: ranges,
            ..ServicePolicy::default()
        };
        for retried in [429, 500, 501, 502, 503, 504] {
            assert!(policy.retries_status(retried), "{retried}");
        }
        for kept in [200, 404, 428, 505] {
            assert!(!policy.retries_status(kept), "{kept}");
        }
        assert_eq!(StatusRange::parse_list("5xx").unwrap().len(), 1);
        for bad in ["4xx", "600", "504-500", "abc", "50-"] {
            assert!(StatusRange::parse_list(bad).is_err(), "{bad}");
        }
    }
}
