//! The workspace's binaries, for tests that run them as real processes.
//!
//! `cargo test --workspace` builds every package's binaries into the profile
//! directory (`target/debug`) before it runs any test, and a test executable lives in
//! `target/debug/deps`, so the binaries are found relative to the running test.
//! Nothing here builds them: a missing binary is a clear failure.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The path of the workspace binary `name` (e.g. `isthmus-init`, `isthmus-proxy`).
///
/// # Panics
///
/// If it has not been built, with the command that builds it.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the running test has a path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("a test executable lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "binary {name} not found at {}: run `cargo build --workspace --bins` first \
         (`cargo test --workspace` builds it too)",
        path.display()
    );
    path
}

/// A copy of a binary in a directory any UID can read and enter, for processes that
/// drop to an unprivileged UID: the checkout may sit under a home directory that
/// only its owner can enter. Removed on drop.
pub struct WorldExecutable {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl WorldExecutable {
    /// Copies `source` into a fresh mode-0755 directory as a mode-0755 file.
    pub fn copy(source: &Path) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("isthmus-bin").tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let name = source.file_name().ok_or_else(|| {
            std::io::Error::other(format!("{} has no file name", source.display()))
        })?;
        let path = dir.path().join(name);
        std::fs::copy(source, &path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self { _dir: dir, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
