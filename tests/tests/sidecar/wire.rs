//! Reading and writing the suite's plain TCP streams: bounded accepts and joins,
//! request heads, how a connection ended, and an echo server.

use super::*;

/// Joins `handle`, failing if it has not finished within `timeout` (the threads
/// themselves are bounded by socket timeouts; this bounds the test's wait).
pub(crate) fn join_within<T>(handle: JoinHandle<T>, timeout: Duration, what: &str) -> T {
    let deadline = Instant::now() + timeout;
    while !handle.is_finished() {
        assert!(
            Instant::now() < deadline,
            "{what} did not finish within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Accepts the one connection that must arrive at `listener` within [`WAIT`].
pub(crate) fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    let local = listener.local_addr().unwrap();
    tcp::accept_within(listener, WAIT)
        .unwrap()
        .unwrap_or_else(|| panic!("no connection arrived at {local} within {WAIT:?}"))
}

/// Reads until `\r\n\r\n` one byte at a time, so nothing after the head is consumed.
pub(crate) fn read_head(stream: &mut TcpStream) -> io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if read_uninterrupted(stream, &mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "closed after {:?}, before the end of the head",
                    String::from_utf8_lossy(&head)
                ),
            ));
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

pub(crate) fn read_exact_string(stream: &mut TcpStream, len: usize) -> String {
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).unwrap();
    String::from_utf8(buf).unwrap()
}

/// Reads one request head and answers it 200, with `headers` (each ending in CRLF)
/// and `{prefix}{request line}\n` as the body; returns the head.
pub(crate) fn answer_with_request_line(
    stream: &mut TcpStream,
    prefix: &str,
    headers: &str,
) -> String {
    let head = read_head(stream).unwrap();
    let line = head.lines().next().unwrap_or_default();
    let body = format!("{prefix}{line}\n");
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{headers}\r\n{body}",
        body.len()
    )
    .unwrap();
    head
}

/// What a read that must fail promptly got: a reset, a clean EOF, or bytes/timeouts
/// (which fail the test with `what`).
#[derive(Debug, PartialEq)]
pub(crate) enum Ending {
    Reset,
    Eof,
}

pub(crate) fn ending(stream: &mut TcpStream, what: &str) -> Ending {
    let mut buf = [0u8; 4096];
    match read_uninterrupted(stream, &mut buf) {
        Ok(0) => Ending::Eof,
        Ok(n) => panic!(
            "{what}: expected the connection to end, got {n} bytes: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ending::Reset,
        Err(e) => panic!("{what}: expected a reset or EOF, got {e} ({:?})", e.kind()),
    }
}

/// One `read`, repeated when a signal interrupted it (`read_exact` and
/// `read_to_end` do that themselves; a bare `read` does not).
pub(crate) fn read_uninterrupted(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Serves `count` echo connections on `listener`, each on a thread of its own:
/// everything read is written back until the client closes its write side.
pub(crate) fn echo_server(listener: TcpListener, count: usize) -> JoinHandle<Vec<SocketAddr>> {
    std::thread::spawn(move || {
        let mut peers = Vec::new();
        let mut workers = Vec::new();
        let deadline = Instant::now() + LONG;
        while peers.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some((mut stream, peer)) = tcp::accept_within(&listener, left).unwrap() else {
                panic!(
                    "echo server: {} of {count} connections arrived",
                    peers.len()
                );
            };
            peers.push(peer);
            workers.push(
                std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        let mut buf = [0u8; 4096];
                        loop {
                            match read_uninterrupted(&mut stream, &mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if stream.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    })
                    .unwrap(),
            );
        }
        for worker in workers {
            worker.join().unwrap();
        }
        peers
    })
}
