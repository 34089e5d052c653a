//! The admin server's own bounds, on the real binary: `--admin-max-connections`
//! (a connection past it is reset at once, and probes are served again once the
//! holders are gone) and `--admin-header-read-timeout` (a silent connection is
//! closed, so holders cannot keep the slots).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{STEP, free_port, mint_identity, spawn_standalone};
use isthmus_test_support::eventually::eventually_blocking;

const MAX: usize = 4;

fn ready(admin: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&admin, STEP) else {
        return false;
    };
    stream.set_read_timeout(Some(STEP)).unwrap();
    if write!(
        stream,
        "GET /ready HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut response = String::new();
    stream.read_to_string(&mut response).is_ok() && response.starts_with("HTTP/1.1 200")
}

/// What a read on `stream` gets within `limit`: `Ok(0)` for a close, `Err` for a
/// reset, `TimedOut` if nothing happened.
fn outcome(stream: &mut TcpStream, limit: Duration) -> std::io::Result<usize> {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Err(ErrorKind::TimedOut.into())
        }
        other => other,
    }
}

#[test]
fn admin_connections_are_bounded_in_number_and_in_silence() {
    let dir = tempfile::tempdir().unwrap();
    let identity = dir.path().join("identity");
    mint_identity(&identity);
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let ip = Ipv4Addr::new(127, 0, 94, 1);
    let listen = SocketAddr::from((ip, free_port()));
    let admin = SocketAddr::from((ip, free_port()));
    let log = dir.path().join("proxy.log");
    let mut proxy = spawn_standalone(
        &identity,
        &manifests,
        listen,
        admin,
        &[
            "--admin-max-connections",
            &MAX.to_string(),
            "--admin-header-read-timeout",
            "1s",
        ],
        &log,
    );
    proxy.wait_ready_blocking();

    // MAX silent holders take every slot; the next connection is reset at once.
    // The server accepts in the order the handshakes completed, so the extra one
    // is the MAX+1st however late the holders are accepted. It sends nothing: a
    // write that met the reset would take the error, and the read after it would
    // see a plain end instead. On a busy machine the reset can also beat the
    // connect's own completion: the same refusal, seen one step earlier.
    let mut holders: Vec<TcpStream> = (0..MAX)
        .map(|_| TcpStream::connect_timeout(&admin, STEP).unwrap())
        .collect();
    let refused =
        TcpStream::connect_timeout(&admin, STEP).and_then(|mut extra| outcome(&mut extra, STEP));
    assert!(
        matches!(&refused, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "a connection past --admin-max-connections was not reset: {refused:?}"
    );

    // The header read timeout closes the silent holders, freeing the slots.
    let started = Instant::now();
    for (i, holder) in holders.iter_mut().enumerate() {
        let closed = outcome(holder, STEP);
        assert!(
            matches!(closed, Ok(0)),
            "silent holder {i} was not closed by the header read timeout: {closed:?}"
        );
    }
    let closed_after = started.elapsed();
    eprintln!("{MAX} silent holders closed within {closed_after:?} (header read timeout 1s)");
    // A holder sees its close a moment before the server frees its slot.
    eventually_blocking(
        "probes served again once the holders are gone",
        STEP,
        || ready(admin).then_some(()),
    );
}
