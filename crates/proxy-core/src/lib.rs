//! The hot path of Isthmus.
//!
//! # Layout
//! - [`addr`]: address newtypes and the original-destination lookup (`SO_ORIGINAL_DST`).
//!
//! proxy-core knows nothing of Kubernetes, files or certificates: it is handed a
//! route lookup and ready-made TLS configurations by its caller.

pub mod addr;
pub mod detect;
pub mod forward;
