//! `isthmus-test-dial ADDR TOKEN [BIND_IP]`: a std-only TCP client the end-to-end
//! tests run as other UIDs (an iptables owner match sees processes, not threads).
//! Connects to ADDR (optionally from BIND_IP), sends TOKEN, closes its write side,
//! waits for the peer to close, and prints its own local address. Every step is
//! bounded by a timeout; any failure exits 1 with a message naming the step.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    match dial() {
        Ok(local) => {
            println!("{local}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("isthmus-test-dial: {e}");
            ExitCode::FAILURE
        }
    }
}

fn dial() -> Result<SocketAddr, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addr, token, bind) = match args.as_slice() {
        [addr, token] => (addr, token, None),
        [addr, token, bind] => (addr, token, Some(bind)),
        _ => return Err("usage: isthmus-test-dial ADDR TOKEN [BIND_IP]".into()),
    };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("ADDR {addr}: {e}"))?;
    let stream = match bind {
        None => TcpStream::connect_timeout(&addr, TIMEOUT)
            .map_err(|e| format!("connecting to {addr}: {e}"))?,
        Some(bind) => {
            let ip: std::net::IpAddr = bind.parse().map_err(|e| format!("BIND_IP {bind}: {e}"))?;
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )
            .map_err(|e| format!("creating a socket: {e}"))?;
            socket
                .bind(&SocketAddr::new(ip, 0).into())
                .map_err(|e| format!("binding {ip}: {e}"))?;
            socket
                .connect_timeout(&addr.into(), TIMEOUT)
                .map_err(|e| format!("connecting to {addr} from {ip}: {e}"))?;
            socket.into()
        }
    };
    let local = stream
        .local_addr()
        .map_err(|e| format!("local address: {e}"))?;
    let io = |what: &str, e: std::io::Error| format!("{what} {addr}: {e}");
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| io("setting timeouts on", e))?;
    let mut stream = stream;
    stream
        .write_all(token.as_bytes())
        .map_err(|e| io("writing to", e))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| io("closing the write side to", e))?;
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .map_err(|e| io("waiting for the close of", e))?;
    Ok(local)
}
