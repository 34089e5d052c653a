//! A mirrored Service's request policy, read from the `timeout.isthmus.io/*` and
//! `retry.isthmus.io/*` annotations (see [`isthmus_vocab::policy`]).
//!
//! Users annotate the ServiceMirror; the reconcile copies those annotations onto
//! the mirrored Service, and the index reads them from there. A value that does not
//! parse is reported (the ServiceMirror's Ready message, a log line) and ignored:
//! that setting keeps its safe default, the others apply.

use std::collections::BTreeMap;
use std::time::Duration;

use isthmus_vocab::ServicePolicy;
use isthmus_vocab::policy::{
    POLICY_ANNOTATIONS, REQUEST_TIMEOUT_ANNOTATION, RESPONSE_TIMEOUT_ANNOTATION,
    RETRY_ANY_METHOD_ANNOTATION, RETRY_HTTP_ANNOTATION, RETRY_LIMIT_ANNOTATION,
    RETRY_TIMEOUT_ANNOTATION, StatusRange,
};

use super::GoDuration;

/// Most retries a Service may ask for: each one is another request to a Service
/// that is already failing.
pub const MAX_RETRY_LIMIT: u32 = 10;

/// A policy annotation whose value was ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation}: {value:?} {reason}; ignored")]
pub struct PolicyError {
    pub annotation: &'static str,
    pub value: String,
    pub reason: String,
}

/// The policy annotations among `annotations`, to copy onto a mirrored Service.
pub fn policy_annotations(
    annotations: &BTreeMap<String, String>,
) -> impl Iterator<Item = (&String, &String)> {
    annotations
        .iter()
        .filter(|(key, _)| POLICY_ANNOTATIONS.contains(&key.as_str()))
}

/// The policy `annotations` set, and the values it ignored.
pub fn read_policy(annotations: &BTreeMap<String, String>) -> (ServicePolicy, Vec<PolicyError>) {
    let mut policy = ServicePolicy::default();
    let mut errors = Vec::new();
    for annotation in POLICY_ANNOTATIONS {
        let Some(value) = annotations.get(annotation) else {
            continue;
        };
        if let Err(reason) = apply(&mut policy, annotation, value.trim()) {
            errors.push(PolicyError {
                annotation,
                value: value.clone(),
                reason,
            });
        }
    }
    (policy, errors)
}

fn apply(policy: &mut ServicePolicy, annotation: &str, value: &str) -> Result<(), String> {
    match annotation {
        REQUEST_TIMEOUT_ANNOTATION => policy.request_timeout = Some(timeout(value)?),
        RESPONSE_TIMEOUT_ANNOTATION => policy.response_timeout = Some(timeout(value)?),
        RETRY_TIMEOUT_ANNOTATION => policy.retry_timeout = Some(timeout(value)?),
        RETRY_LIMIT_ANNOTATION => {
            policy.retry_limit =
                value
                    .parse()
                    .ok()
                    .filter(|n| *n <= MAX_RETRY_LIMIT)
                    .ok_or(format!(
                        "is not a number of retries from 0 to {MAX_RETRY_LIMIT}"
                    ))?;
        }
        RETRY_HTTP_ANNOTATION => {
            policy.retry_statuses = StatusRange::parse_list(value).map_err(|e| e.to_string())?;
        }
        RETRY_ANY_METHOD_ANNOTATION => {
            policy.retry_any_method = match value {
                "true" => true,
                "false" => false,
                _ => return Err("is neither \"true\" nor \"false\"".to_owned()),
            };
        }
        _ => {}
    }
    Ok(())
}

/// A timeout: a duration above zero (a zero deadline would fail every request).
fn timeout(value: &str) -> Result<Duration, String> {
    let GoDuration(duration) = GoDuration::parse(value).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("is zero: leave the annotation out for no timeout".to_owned());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn annotations_set_the_policy() {
        let (policy, errors) = read_policy(&annotations(&[
            (REQUEST_TIMEOUT_ANNOTATION, "200ms"),
            (RESPONSE_TIMEOUT_ANNOTATION, "1m30s"),
            (RETRY_LIMIT_ANNOTATION, "3"),
            (RETRY_TIMEOUT_ANNOTATION, "50ms"),
            (RETRY_HTTP_ANNOTATION, "gateway-error,429"),
            (RETRY_ANY_METHOD_ANNOTATION, "true"),
            ("unrelated.example/x", "y"),
        ]));
        assert_eq!(errors, []);
        assert_eq!(policy.request_timeout, Some(Duration::from_millis(200)));
        assert_eq!(policy.response_timeout, Some(Duration::from_secs(90)));
        assert_eq!(policy.retry_limit, 3);
        assert_eq!(policy.retry_timeout, Some(Duration::from_millis(50)));
        assert!(policy.retries_status(503) && policy.retries_status(429));
        assert!(policy.retry_any_method);
    }

    #[test]
    fn no_annotations_is_the_safe_default() {
        let (policy, errors) = read_policy(&BTreeMap::new());
        assert_eq!((policy, errors), (ServicePolicy::default(), vec![]));
    }

    #[test]
    fn a_bad_value_is_reported_and_only_it_ignored() {
        let (policy, errors) = read_policy(&annotations(&[
            (REQUEST_TIMEOUT_ANNOTATION, "soon"),
            (RESPONSE_TIMEOUT_ANNOTATION, "0s"),
            (RETRY_LIMIT_ANNOTATION, "11"),
            (RETRY_TIMEOUT_ANNOTATION, "100ms"),
            (RETRY_HTTP_ANNOTATION, "4xx"),
            (RETRY_ANY_METHOD_ANNOTATION, "yes"),
        ]));
        let ignored: Vec<_> = errors.iter().map(|e| e.annotation).collect();
        assert_eq!(
            ignored,
            [
                REQUEST_TIMEOUT_ANNOTATION,
                RESPONSE_TIMEOUT_ANNOTATION,
                RETRY_LIMIT_ANNOTATION,
                RETRY_HTTP_ANNOTATION,
                RETRY_ANY_METHOD_ANNOTATION
            ]
        );
        assert_eq!(
            errors[0].to_string(),
            format!(
                "annotation {REQUEST_TIMEOUT_ANNOTATION}: \"soon\" {}; ignored",
                errors[0].reason
            )
        );
        assert_eq!(
            policy,
            ServicePolicy {
                retry_timeout: Some(Duration::from_millis(100)),
                ..ServicePolicy::default()
            }
        );
    }

    #[test]
    fn only_policy_annotations_are_copied() {
        let all = annotations(&[(REQUEST_TIMEOUT_ANNOTATION, "1s"), ("other/x", "y")]);
        let copied: Vec<_> = policy_annotations(&all).map(|(k, _)| k.as_str()).collect();
        assert_eq!(copied, [REQUEST_TIMEOUT_ANNOTATION]);
    }
}
