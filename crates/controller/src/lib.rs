//! The ServiceMirror controller: watches `ServiceMirror` objects in its own
//! cluster and the remote Services they name, and applies the mirrored Services
//! that `proxy_discovery::reconcile` computes.
