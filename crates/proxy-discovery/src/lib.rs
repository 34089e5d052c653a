//! The mesh model, the ServiceMirror reconcile, discovery sources and the route index.
