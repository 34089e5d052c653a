//! `SO_ORIGINAL_DST` without iptables.

use super::*;

/// `SO_ORIGINAL_DST` without iptables: the destination each client address meant,
/// registered by the test before it connects ([`FakeOrigDst::connect`]).
///
/// A client nobody registered gets `unmapped` when set (every redirected connection
/// "meant" that address, as the proxy's own captured sockets do in a loop), else
/// the error the kernel gives a socket that was not redirected.
#[derive(Default)]
pub struct FakeOrigDst {
    table: Mutex<HashMap<SocketAddr, SocketAddr>>,
    unmapped: Mutex<Option<SocketAddr>>,
}

impl FakeOrigDst {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// From now on, clients nobody registered meant `dst`.
    pub fn set_unmapped(&self, dst: SocketAddr) {
        *self.unmapped.lock().unwrap() = Some(dst);
    }

    pub fn map(&self, client: SocketAddr, dst: SocketAddr) {
        self.table.lock().unwrap().insert(client, dst);
    }

    /// Connects to `listener` from loopback as a client that meant `dst`.
    pub async fn connect(&self, listener: SocketAddr, dst: SocketAddr) -> TcpStream {
        self.try_connect(listener, dst)
            .await
            .unwrap_or_else(|e| panic!("connecting to the proxy as a client of {dst}: {e}"))
    }

    /// [`FakeOrigDst::connect`] for a connection the proxy may reset at once: a
    /// reset that lands before the connect is reported completes it with an error.
    pub async fn try_connect(
        &self,
        listener: SocketAddr,
        dst: SocketAddr,
    ) -> io::Result<TcpStream> {
        self.connect_from(IpAddr::V4(Ipv4Addr::LOCALHOST), listener, dst)
            .await
    }

    /// [`FakeOrigDst::try_connect`] from the address `source`.
    pub async fn connect_from(
        &self,
        source: IpAddr,
        listener: SocketAddr,
        dst: SocketAddr,
    ) -> io::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        // Registered before the SYN: the handler may ask as soon as it accepts.
        self.map(socket.local_addr()?, dst);
        tokio::time::timeout(STEP, socket.connect(listener))
            .await
            .expect("connect to the proxy timed out")
    }
}

impl OrigDst for FakeOrigDst {
    fn orig_dst(&self, stream: &TcpStream, _local: SocketAddr) -> io::Result<OrigDstAddr> {
        let client = stream.peer_addr()?;
        let dst = self.table.lock().unwrap().get(&client).copied();
        dst.or(*self.unmapped.lock().unwrap())
            .map(OrigDstAddr)
            .ok_or_else(|| io::Error::from_raw_os_error(libc_enoent()))
    }
}

/// `ENOENT`, what the kernel answers for a socket without a NAT mapping.
fn libc_enoent() -> i32 {
    nix::errno::Errno::ENOENT as i32
}
