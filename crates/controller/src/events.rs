//! Kubernetes Events on ServiceMirrors, through kube-runtime's recorder: one
//! event each time a mirror's `Mirrored` condition changes its reason, so
//! `kubectl describe sm` tells the story (imported, conflict, refused, removed,
//! unreachable)
//! without an event per resync.
//!
//! Not here: the condition itself (the status, written by the reconcile), and
//! retrying an event the API server refused (an event is worth a log line, not a
//! failed reconcile).

use kube::Resource as _;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use proxy_discovery::reconcile::MirrorReason;

use crate::kinds::ServiceMirrorResource;

/// The reporting controller's name on every event.
pub const REPORTER: &str = "isthmus-controller";

/// Publishes the events of one controller replica.
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
}

impl Events {
    /// Events written through `client`, reported by `instance` (the pod's name).
    pub fn new(client: kube::Client, instance: &str) -> Self {
        let reporter = Reporter {
            controller: REPORTER.to_owned(),
            instance: Some(instance.to_owned()),
        };
        Self {
            recorder: Recorder::new(client, reporter),
        }
    }

    /// Records that `sm`, whose status said what it says now, is now `reason`:
    /// an event when that is a change.
    pub async fn mirrored(&self, sm: &ServiceMirrorResource, reason: &str) {
        let before = sm
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Mirrored"))
            .map(|c| c.reason.as_str());
        let Some(event) = event(before, reason) else {
            return;
        };
        if let Err(e) = self.recorder.publish(&event, &sm.object_ref(&())).await {
            tracing::warn!(error = %isthmus_vocab::error_chain(&e), reason,
                "cannot record an event on the ServiceMirror");
        }
    }
}

/// The event for a change of the `Mirrored` reason from `before` to `now`.
pub fn event(before: Option<&str>, now: &str) -> Option<Event> {
    // A new mirror waits for its remote watch's first answer: not yet news.
    if before == Some(now) || (before.is_none() && now == crate::mirror::REMOTE_UNREACHABLE) {
        return None;
    }
    let mirrored = MirrorReason::Mirrored.as_str();
    let (type_, reason, note) = if now == mirrored {
        (
            EventType::Normal,
            "Imported",
            "the remote Service is mirrored here".to_owned(),
        )
    } else if now == MirrorReason::NameConflict.as_str() {
        (
            EventType::Warning,
            "Conflict",
            "a local Service of that name exists and is not this mirror's".to_owned(),
        )
    } else if now == crate::mirror::REMOTE_UNREACHABLE {
        (
            EventType::Warning,
            "Unreachable",
            "the remote cluster's API server does not answer".to_owned(),
        )
    } else if before == Some(mirrored) {
        (
            EventType::Warning,
            "Removed",
            format!("the mirrored Service was removed: {now}"),
        )
    } else {
        (
            EventType::Warning,
            "Refused",
            format!("not mirrored: {now}"),
        )
    };
    Some(Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(before: Option<&str>, now: &str) -> Option<String> {
        event(before, now).map(|e| e.reason)
    }

    #[test]
    fn one_event_per_change_of_reason() {
        assert_eq!(said(None, "Mirrored").as_deref(), Some("Imported"));
        assert_eq!(said(Some("Mirrored"), "Mirrored"), None);
        assert_eq!(
            said(Some("Mirrored"), "NameConflict").as_deref(),
            Some("Conflict")
        );
        assert_eq!(
            said(Some("Mirrored"), "RemoteServiceNotFound").as_deref(),
            Some("Removed")
        );
        assert_eq!(said(None, "NotExported").as_deref(), Some("Refused"));
        assert_eq!(said(Some("NotExported"), "NotExported"), None);
        assert_eq!(said(None, "RemoteUnreachable"), None);
        assert_eq!(
            said(Some("Mirrored"), "RemoteUnreachable").as_deref(),
            Some("Unreachable")
        );
    }
}
