//! Workload identities of the mesh: SPIFFE IDs, their certificates and the rustls
//! configurations that authenticate peers by them.
