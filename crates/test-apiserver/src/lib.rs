//! An in-memory Kubernetes API server that speaks the real REST and watch
//! protocol, so controllers are tested through kube-rs clients end to end.
