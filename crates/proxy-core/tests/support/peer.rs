//! Mesh peers: mTLS and the production tunnel server on loopback.

use super::*;

/// How a [`TunnelPeer`] answers a stream.
#[derive(Clone, Debug)]
pub enum Answer {
    /// Accepts it and connects it to this address.
    Deliver(SocketAddr),
    /// Refuses it with this reason.
    Refuse(Refusal),
    /// Never answers (a black-holed peer).
    Silent,
}

/// A CONNECT stream as the tunnel peer received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    /// `:authority`.
    pub authority: String,
    /// The `isthmus-cluster` header.
    pub cluster: Option<String>,
    /// The client's verified SPIFFE ID and cluster.
    pub peer_id: Option<String>,
    pub peer_cluster: Option<String>,
}

/// Answers streams by authority from a table; records every request.
pub struct ScriptedTunnel {
    answers: HashMap<String, Answer>,
    default: Answer,
    seen: mpsc::UnboundedSender<SeenRequest>,
}

impl TunnelHandler for ScriptedTunnel {
    async fn open(&self, request: &TunnelRequest) -> Result<Upstream, Refusal> {
        let _ = self.seen.send(SeenRequest {
            authority: request.authority.to_string(),
            cluster: request.cluster.as_ref().map(|c| c.to_string()),
            peer_id: request.peer.id.as_deref().map(str::to_owned),
            peer_cluster: request.peer.cluster.as_ref().map(|c| c.to_string()),
        });
        let answer = self
            .answers
            .get(request.authority.as_str())
            .unwrap_or(&self.default);
        match answer {
            Answer::Deliver(addr) => match TcpStream::connect(addr).await {
                Ok(stream) => Ok(Upstream::Connected(Box::new(stream))),
                Err(_) => Err(Refusal::UpstreamRefused),
            },
            Answer::Refuse(refusal) => Err(*refusal),
            Answer::Silent => std::future::pending().await,
        }
    }
}

/// A mesh peer on loopback: mTLS with its own minted identity, the production
/// tunnel server, a [`ScriptedTunnel`] behind it.
pub struct TunnelPeer {
    pub addr: SocketAddr,
    pub identity: Identity,
    pub metrics: ProxyMetrics,
    seen: mpsc::UnboundedReceiver<SeenRequest>,
    mesh: MeshListener,
}

impl TunnelPeer {
    /// A gateway of [`CLUSTER`] answering `answers` by authority and `default`
    /// otherwise, accepting clients of its own cluster.
    pub async fn spawn(pki: &Pki, answers: &[(&str, Answer)], default: Answer) -> TunnelPeer {
        let identity = pki.identity(CLUSTER, GATEWAY_ID);
        let (tx, seen) = mpsc::unbounded_channel();
        let handler = ScriptedTunnel {
            answers: answers
                .iter()
                .map(|(a, answer)| ((*a).to_owned(), answer.clone()))
                .collect(),
            default,
            seen: tx,
        };
        let metrics = ProxyMetrics::default();
        let policy = identity.own_cluster_policy();
        let mesh = MeshListener::spawn(&identity, policy, Arc::new(handler), &metrics).await;
        TunnelPeer {
            addr: mesh.addr,
            identity,
            metrics,
            seen,
            mesh,
        }
    }

    /// A peer that refuses `refusedN.test:80` with the Nth of [`Refusal::ALL`] and
    /// leaves any other stream unanswered; with those authorities, in that order.
    pub async fn refusing_each(pki: &Pki) -> (TunnelPeer, Vec<String>) {
        let authorities: Vec<String> = (0..Refusal::ALL.len())
            .map(|i| format!("refused{i}.test:80"))
            .collect();
        let answers: Vec<(&str, Answer)> = authorities
            .iter()
            .zip(Refusal::ALL)
            .map(|(a, refusal)| (a.as_str(), Answer::Refuse(refusal)))
            .collect();
        let peer = TunnelPeer::spawn(pki, &answers, Answer::Silent).await;
        (peer, authorities)
    }

    /// The next stream request the peer received.
    pub async fn next_request(&mut self) -> SeenRequest {
        next_within(
            &mut self.seen,
            "the tunnel peer received no request in time",
        )
        .await
    }

    /// A request received so far, if any (to prove none came).
    pub fn try_request(&mut self) -> Option<SeenRequest> {
        self.seen.try_recv().ok()
    }

    /// GOAWAY on every connection: streams in flight finish, no new ones.
    pub fn drain(&self) {
        self.mesh.drain();
    }
}

/// Any [`TunnelHandler`] behind mTLS on loopback, as a mesh listener serves it:
/// the production tunnel server, peers identified from their verified leaves
/// (`Direction::Gateway` metrics). For a peer whose handler is not scripted (a
/// gateway under test as the far end of another test's tunnel, say).
pub struct MeshListener {
    pub addr: SocketAddr,
    drain: CancellationToken,
    task: JoinHandle<()>,
}

impl MeshListener {
    /// Serves `handler` as `identity`, accepting clients `policy` allows.
    pub async fn spawn<H: TunnelHandler>(
        identity: &Identity,
        policy: PeerPolicy,
        handler: Arc<H>,
        metrics: &ProxyMetrics,
    ) -> MeshListener {
        let server = TunnelServer::new(
            handler,
            H2Settings::default(),
            ForwardConfig::default(),
            metrics.clone(),
            Direction::Gateway,
        );
        let tls = tokio_rustls::TlsAcceptor::from(identity.server_config(policy));
        let identify = identity.identify();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let drain = CancellationToken::new();
        let drain_rx = drain.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (server, tls, identify, drain) = (
                    server.clone(),
                    tls.clone(),
                    identify.clone(),
                    drain_rx.clone(),
                );
                tokio::spawn(async move {
                    let Ok(stream) = tls.accept(tcp).await else {
                        return;
                    };
                    let peer = identify(stream.get_ref().1);
                    let _ = server.serve_connection(stream, peer, drain).await;
                });
            }
        });
        MeshListener { addr, drain, task }
    }

    /// GOAWAY on every connection: streams in flight finish, no new ones.
    pub fn drain(&self) {
        self.drain.cancel();
    }
}

impl Drop for MeshListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}
