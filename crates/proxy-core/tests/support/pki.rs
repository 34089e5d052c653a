//! Minted identities: one anchor, an issuer per cluster, leaves in credential stores.

use super::*;

/// One trust anchor and an issuer per cluster, minted on demand.
pub struct Pki {
    anchor: mint::CertificateAuthority,
    issuers: Mutex<HashMap<String, mint::CertificateAuthority>>,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    pub fn new() -> Pki {
        let anchor = mint::trust_anchor(
            &mint::default_anchor_name(),
            Validity::from_now(Duration::from_secs(3600)),
            KeyAlgorithm::default(),
        )
        .unwrap();
        Pki {
            anchor,
            issuers: Mutex::new(HashMap::new()),
        }
    }

    /// A leaf for `spiffe` from `cluster`'s issuer, ready to present.
    pub fn identity(&self, cluster: &str, spiffe: &str) -> Identity {
        let mut issuers = self.issuers.lock().unwrap();
        let issuer = issuers.entry(cluster.to_owned()).or_insert_with(|| {
            // Shorter than the anchor's: an issuer minted seconds later must not
            // outlive it, which the mint refuses.
            mint::issuer(
                &self.anchor,
                cluster,
                Validity::from_now(Duration::from_secs(3000)),
                KeyAlgorithm::default(),
            )
            .unwrap()
        });
        let id = SpiffeId::parse(spiffe).unwrap();
        let leaf = mint::leaf(
            issuer,
            &id,
            Validity::from_now(Duration::from_secs(1800)),
            KeyAlgorithm::default(),
        )
        .unwrap();
        // The paths only name files in errors: nothing is read or watched.
        let paths = CredentialPaths::in_dir("/nonexistent/in-memory");
        let creds = leaf.credentials(&paths, SystemTime::now()).unwrap();
        Identity {
            id,
            cluster: cluster.to_owned(),
            store: Arc::new(CredentialStore::from_credentials(paths, creds)),
        }
    }
}

/// A minted leaf in a credential store, and the configs production builds from it.
#[derive(Clone)]
pub struct Identity {
    pub id: SpiffeId,
    pub cluster: String,
    pub store: Arc<CredentialStore>,
}

impl Identity {
    /// What a peer dialling this identity requires: exactly this ID, from this
    /// cluster's issuer (as a sidecar checks its gateway).
    pub fn as_peer(&self) -> PeerPolicy {
        PeerPolicy::Exact(self.id.clone())
            .in_cluster(isthmus_vocab::ClusterName::parse(&self.cluster).unwrap())
    }

    /// What this identity accepts from clients: its trust domain, own cluster.
    pub fn own_cluster_policy(&self) -> PeerPolicy {
        PeerPolicy::TrustDomain(self.id.trust_domain().clone())
            .in_cluster(isthmus_vocab::ClusterName::parse(&self.cluster).unwrap())
    }

    /// The mesh listener's server config, accepting clients `policy` allows.
    pub fn server_config(&self, policy: PeerPolicy) -> Arc<proxy_identity::rustls::ServerConfig> {
        proxy_identity::mesh_server_config(self.store.clone(), policy)
    }

    /// A client config presenting this leaf to a server `policy` allows.
    pub fn client_config(&self, policy: PeerPolicy) -> Arc<proxy_identity::rustls::ClientConfig> {
        proxy_identity::client_config(self.store.clone(), policy)
    }

    /// Reads a client's [`Peer`] from a finished handshake, as the proxy does.
    pub fn identify(&self) -> PeerIdentify {
        let store = self.store.clone();
        Arc::new(move |conn| Peer {
            id: proxy_identity::peer_identity(conn).map(|id| Arc::from(id.to_string())),
            cluster: proxy_identity::peer_cluster(conn, &store),
            expires: proxy_identity::connection_deadline(conn, &store),
        })
    }

    /// A warm pool of tunnel connections from this identity to `server` at `addr`.
    pub fn pool_to(&self, server: &Identity, addr: SocketAddr) -> Pool {
        let sni = proxy_identity::sni_name(&server.id).unwrap();
        let cfg = PeerConfig {
            name: Arc::from(format!("gateway/{}", server.cluster)),
            addr,
            server_name: ServerName::try_from(sni).unwrap(),
            tls: self.client_config(server.as_peer()),
            connect_timeout: Duration::from_secs(2),
            connections: 1,
            h2: H2Settings::default(),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            handshake_failed: None,
            deadline: None,
        };
        Pool::spawn(cfg, never_drained())
    }
}

/// A drain signal nobody sends: its sender is gone, so it never fires.
pub fn never_drained() -> CancellationToken {
    CancellationToken::new()
}
