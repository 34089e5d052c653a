//! The run's identities, minted as csi-driver-spiffe issues them on a cluster:
//! one trust anchor, an issuer per cluster (kept for the pods started later),
//! and a leaf per gateway and meshed pod in its identity volume, readable by
//! the proxy UID only.

use super::*;

impl Lab {
    /// One trust anchor, one issuer per cluster (kept for pods started later), a
    /// leaf per gateway and per meshed pod.
    pub(super) fn mint_identities(&mut self) -> Result<()> {
        let anchor = mint::trust_anchor(&mint::default_anchor_name(), self.validity, KEY_ALGORITHM)
            .context("minting the lab's trust anchor")?;
        anchor
            .write_dir(&self.dir(&["identity", "trust-anchor"]), true)
            .context("writing the trust anchor")?;
        for c in &self.plan.clusters {
            let name = c.spec.name.as_str();
            let issuer = mint::issuer(&anchor, name, self.validity, KEY_ALGORITHM)
                .with_context(|| format!("minting the issuer of cluster {name}"))?;
            self.issuers.push(issuer);
        }
        for (ci, c) in self.plan.clusters.iter().enumerate() {
            self.mint_leaf(ci, "gateway", &c.gateway_identity)?;
            for pod in c.pods.iter().filter(|p| p.meshed) {
                self.mint_leaf(ci, &pod.name, &pod.identity)?;
            }
        }
        Ok(())
    }

    /// The identity `id` of `who` (a pod, or `gateway`) of cluster `ci`, in its
    /// identity volume, readable by the proxy UID only.
    pub(super) fn mint_leaf(&self, ci: usize, who: &str, id: &str) -> Result<()> {
        let name = self.plan.clusters[ci].spec.name.as_str();
        let spiffe = SpiffeId::parse(id).with_context(|| format!("identity {id}"))?;
        let root = self.pod_root(name, who);
        let dir = mount_dir(&root, IDENTITY_MOUNT);
        mint::leaf(&self.issuers[ci], &spiffe, self.validity, KEY_ALGORITHM)
            .and_then(|leaf| leaf.write_dir(&dir, true))
            .with_context(|| format!("minting {id} for {name}/{who}"))?;
        for path in std::iter::once(dir.clone()).chain(
            std::fs::read_dir(&dir)?
                .filter_map(Result::ok)
                .map(|e| e.path()),
        ) {
            chown(
                &path,
                Some(Uid::from_raw(PROXY_UID)),
                Some(Gid::from_raw(PROXY_UID)),
            )
            .with_context(|| format!("handing {} to UID {PROXY_UID}", path.display()))?;
        }
        let parents = [self.dir(&["pods"]), self.dir(&["pods", name])];
        for dir in parents.into_iter().chain(walk_dirs(&root)) {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(())
    }
}
