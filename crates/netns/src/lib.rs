//! Network namespaces for everything in the workspace that needs a kernel's
//! network: the lab (`isthmus lab up`), the end-to-end tests and the side-by-side
//! benchmark.
//!
//! A [`Net`] owns what one run creates: namespaces ([`Namespace`]), the bridges and
//! veth pairs inside them, hosts files, and child processes. Every name starts with
//! the run's prefix, `<tag><pid in hex>` (the tag tells lab, tests and benchmark
//! apart): namespaces are `<prefix>-<suffix>`, interfaces `<prefix><letter><n>`,
//! at most 15 bytes, the kernel's limit. Dropping a [`Net`], or calling
//! [`Net::teardown`], stops the processes in its namespaces (SIGTERM, then SIGKILL
//! after a grace period), deletes the namespaces (which takes every link inside
//! along), their hosts files and the run's record directory; [`sweep`] removes what
//! a killed run left, found by its prefix.
//!
//! Addresses are checked to come from 198.18.0.0/15 or 2001:2::/48, and nothing here
//! adds a default route or NAT: traffic stays between the namespaces of the run.
//!
//! Namespaces are entered with `setns` on a thread of their own
//! ([`Namespace::run`]): a network namespace belongs to a thread, sockets keep the
//! namespace they were made in, and a process forked from such a thread starts in
//! it, which is how [`Namespace::spawn_as`] starts a program under another UID
//! (`ip netns exec` cannot drop privileges). Everything else goes through the `ip`
//! command.

mod command;
mod error;
mod name;
mod namespace;
mod net;
mod sweep;

pub use command::{run_checked, run_with_input, spawn_when_not_busy, wait_with_timeout};
pub use error::Error;
pub use name::{MAX_IFNAME, allowed};
pub use namespace::Namespace;
pub use net::{Net, Options};
pub use sweep::{Swept, sweep};

/// What every function of this crate returns.
pub type Result<T, E = Error> = std::result::Result<T, E>;
