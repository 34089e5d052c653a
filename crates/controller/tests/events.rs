//! Events on ServiceMirrors, as `kubectl describe sm` lists them: one when the
//! mirror is imported, one when its Service is removed, none per resync.

#![allow(clippy::unwrap_used)]

mod fixture;

use fixture::*;
use k8s_openapi::api::events::v1::Event;

/// The reasons of the events regarding `hello-mirror`, oldest first.
async fn reasons(lab: &Lab) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(lab.local.client(), "default");
    let mut list = timed("list events", events.list(&Default::default()))
        .await
        .unwrap()
        .items;
    list.retain(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("hello-mirror"));
    list.sort_by_key(|e| e.metadata.creation_timestamp.clone().map(|t| t.0));
    list.into_iter().filter_map(|e| e.reason).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_s_events_tell_its_story() {
    let (lab, controller) = Lab::seed_mirrored().await;
    eventually("an Imported event", || async {
        (reasons(&lab).await == ["Imported"]).then_some(())
    })
    .await;
    lab.delete_remote("hello").await;
    lab.reason("hello-mirror", "RemoteServiceNotFound").await;
    eventually("a Removed event after it", || async {
        (reasons(&lab).await == ["Imported", "Removed"]).then_some(())
    })
    .await;
    let event: Api<Event> = Api::namespaced(lab.local.client(), "default");
    let removed = event.list(&Default::default()).await.unwrap().items;
    let removed = removed
        .iter()
        .find(|e| e.reason.as_deref() == Some("Removed"))
        .unwrap();
    assert_eq!(removed.type_.as_deref(), Some("Warning"));
    assert_eq!(
        removed.reporting_controller.as_deref(),
        Some("isthmus-controller")
    );
    assert!(
        removed
            .note
            .as_deref()
            .unwrap()
            .contains("RemoteServiceNotFound")
    );
    controller.stop().await;
}
