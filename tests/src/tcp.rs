//! Bounded TCP helpers for tests: every wait has a deadline, and "nothing arrived"
//! is checked without waiting at all once the positive path has proven where the
//! connection went.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// How long a test waits for a connection or bytes that should come.
pub const WAIT: Duration = Duration::from_secs(5);

/// Poll interval of [`accept_within`]; short, since accepts normally arrive at once.
const POLL: Duration = Duration::from_millis(5);

/// Binds a listener that [`accept_within`] and [`pending`] can use. Call it on a
/// thread inside the namespace the listener belongs to (`Namespace::run`).
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Accepts one connection, or `Ok(None)` after `timeout`. The stream is blocking
/// with read and write timeouts of [`WAIT`].
pub fn accept_within(
    listener: &TcpListener,
    timeout: Duration,
) -> io::Result<Option<(TcpStream, SocketAddr)>> {
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(WAIT))?;
                stream.set_write_timeout(Some(WAIT))?;
                return Ok(Some((stream, peer)));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(POLL);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether a connection is waiting to be accepted right now (it is accepted and
/// dropped if so).
pub fn pending(listener: &TcpListener) -> io::Result<bool> {
    Ok(accept_within(listener, Duration::ZERO)?.is_some())
}

/// Connects within [`WAIT`]; the stream has read and write timeouts of [`WAIT`].
/// Call it on a thread inside the client's namespace.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, WAIT)?;
    stream.set_read_timeout(Some(WAIT))?;
    stream.set_write_timeout(Some(WAIT))?;
    Ok(stream)
}

/// Writes `token` and closes the write side.
pub fn send(stream: &mut TcpStream, token: &str) -> io::Result<()> {
    stream.write_all(token.as_bytes())?;
    stream.shutdown(Shutdown::Write)
}

/// Reads until the peer closes its write side (bounded by the stream's timeouts).
pub fn receive(stream: &mut TcpStream) -> io::Result<String> {
    let mut buf = String::new();
    stream.read_to_string(&mut buf)?;
    Ok(buf)
}

/// One `read`, repeated when a signal interrupted it: tests that signal processes
/// must not mistake `EINTR` for how the peer ended the connection. Bounded by the
/// stream's own read timeout.
pub fn read_once(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Reads until EOF or reset and returns what arrived; the assertion that the peer
/// closes `stream` within `limit`. A signal interrupting a read is retried.
///
/// # Panics
///
/// With `what` in the message, when the connection is still open after `limit` or
/// a read fails other than by a reset.
pub fn closed_within(stream: &mut TcpStream, limit: Duration, what: &str) -> Vec<u8> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{what}: still open after {limit:?}");
        if let Err(e) = stream.set_read_timeout(Some(left)) {
            panic!("{what}: setting a read timeout: {e}");
        }
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!("{what}: still open after {limit:?}")
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// One HTTP/1.1 response whose body has a `content-length` (none counts as 0),
/// read off a kept-alive connection with each read bounded by `limit`; returns the
/// head and body as text.
///
/// # Panics
///
/// When the response is cut short or a read fails or times out.
pub fn read_response(stream: &mut TcpStream, limit: Duration) -> String {
    if let Err(e) = stream.set_read_timeout(Some(limit)) {
        panic!("setting a read timeout to read a response: {e}");
    }
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) => panic!("response cut short"),
            Err(e) => panic!("reading a response head: {e}"),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if let Err(e) = stream.read_exact(&mut body) {
        panic!("reading a {len}-byte response body: {e}");
    }
    head + &String::from_utf8_lossy(&body)
}

/// An echo server on `listener` for any number of connections, each on a small
/// thread of its own that gives up after `idle` without a byte; runs until the test
/// process ends.
pub fn echo_forever(listener: TcpListener, idle: Duration) {
    listener
        .set_nonblocking(false)
        .expect("a blocking listener");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    let _ = stream.set_read_timeout(Some(idle));
                    let Ok(mut reader) = stream.try_clone() else {
                        return;
                    };
                    let _ = io::copy(&mut reader, &mut stream);
                })
                .expect("an echo thread");
        }
    });
}
