//! Traffic capture for a pod's network namespace.
