//! In-process upstreams that report how each connection went.

use super::*;

/// What an [`Origin`] does with each connection.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Echoes every byte; at the client's end of stream, ends its own side.
    Echo,
    /// Sends these bytes and ends its side at once, then reads to the client's end.
    GreetAndHalfClose(&'static [u8]),
    /// Reads to the client's end of stream, then answers `got <n> bytes` and ends.
    ReplyAfterEof,
    /// Reads this many bytes, then resets the connection (RST).
    ResetAfter(usize),
    /// Serves HTTP/1.1: `200` with body `<method> <path> host=<Host>`, after waiting
    /// `delay` (to hold a request in flight).
    Http { delay: Duration },
}

/// How an origin saw one connection end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The client ended its side in order.
    Eof,
    /// The client reset the connection.
    Reset,
    /// The origin closed it (after its own reset or an HTTP exchange).
    ByOrigin,
}

/// One connection an origin served.
#[derive(Clone, Debug)]
pub struct Served {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub received: Vec<u8>,
    pub ended: Ended,
}

/// An in-process upstream on loopback.
pub struct Origin {
    pub addr: SocketAddr,
    /// HTTP requests that reached the origin's handler so far (answered or not).
    pub requests_started: Arc<std::sync::atomic::AtomicUsize>,
    served: mpsc::UnboundedReceiver<Served>,
    task: JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    /// An origin on `127.0.0.1` with a port of its own.
    pub async fn spawn(behaviour: Behaviour) -> Origin {
        Self::spawn_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), behaviour).await
    }

    /// An origin bound to `addr` (another loopback address, a chosen port).
    pub async fn spawn_on(addr: SocketAddr, behaviour: Behaviour) -> Origin {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, served) = mpsc::unbounded_channel();
        let requests_started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let started = requests_started.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let tx = tx.clone();
                let behaviour = behaviour.clone();
                let started = started.clone();
                tokio::spawn(async move {
                    let local = stream.local_addr().unwrap();
                    let (received, ended) = serve_origin(stream, behaviour, started).await;
                    let _ = tx.send(Served {
                        peer,
                        local,
                        received,
                        ended,
                    });
                });
            }
        });
        Origin {
            addr,
            requests_started,
            served,
            task,
        }
    }

    /// The next connection this origin finished serving.
    pub async fn next_served(&mut self) -> Served {
        next_within(
            &mut self.served,
            "the origin finished no connection in time",
        )
        .await
    }

    /// A connection finished so far, if any (to prove none came).
    pub fn try_served(&mut self) -> Option<Served> {
        self.served.try_recv().ok()
    }
}

async fn serve_origin(
    mut stream: TcpStream,
    behaviour: Behaviour,
    started: Arc<std::sync::atomic::AtomicUsize>,
) -> (Vec<u8>, Ended) {
    let mut received = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    match behaviour {
        Behaviour::Echo => loop {
            match stream.read(&mut buf).await {
                Ok(0) => {
                    let _ = stream.shutdown().await;
                    return (received, Ended::Eof);
                }
                Ok(n) => {
                    received.extend_from_slice(&buf[..n]);
                    if stream.write_all(&buf[..n]).await.is_err() {
                        return (received, Ended::Reset);
                    }
                }
                Err(_) => return (received, Ended::Reset),
            }
        },
        Behaviour::GreetAndHalfClose(greeting) => {
            let _ = stream.write_all(greeting).await;
            let _ = stream.shutdown().await;
            match stream.read_to_end(&mut received).await {
                Ok(_) => (received, Ended::Eof),
                Err(_) => (received, Ended::Reset),
            }
        }
        Behaviour::ReplyAfterEof => {
            let ended = match stream.read_to_end(&mut received).await {
                Ok(_) => Ended::Eof,
                Err(_) => return (received, Ended::Reset),
            };
            let reply = format!("got {} bytes", received.len());
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
            (received, ended)
        }
        Behaviour::ResetAfter(n) => {
            received.resize(n, 0);
            let ended = match stream.read_exact(&mut received).await {
                Ok(_) => Ended::ByOrigin,
                Err(_) => Ended::Reset,
            };
            proxy_core::listen::reset(stream);
            (received, ended)
        }
        Behaviour::Http { delay } => {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    tokio::time::sleep(delay).await;
                    let host = req
                        .headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let body = format!("{} {} host={host}", req.method(), req.uri());
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                        body,
                    ))))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            (received, Ended::ByOrigin)
        }
    }
}
