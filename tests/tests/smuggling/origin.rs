//! A strict HTTP/1.1 origin on a raw TCP listener: it records every byte each
//! connection brought, parses them by RFC 9112's strict grammar (no leading empty
//! lines, CRLF only, one SP between request-line words, no whitespace before a
//! colon, no obs-fold, no bare CR or NUL, framing by one `Content-Length` or one
//! `Transfer-Encoding: chunked`, never both), and answers each request it parsed
//! `200` with a body naming it. What it could not parse it records as malformed
//! (and answers `400` and closes), so a test sees exactly what an origin behind
//! the proxy would have taken for requests.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isthmus_tests::tcp;

/// One request as the origin parsed it.
#[derive(Clone, Debug)]
pub struct Parsed {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Parsed {
    /// The values of every header named `name` (in any case), in order.
    fn values(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Whether both framing headers arrived (what must never happen).
    pub fn has_cl_and_te(&self) -> bool {
        !self.values("content-length").is_empty() && !self.values("transfer-encoding").is_empty()
    }
}

/// How a connection's bytes ended, as the origin read them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Still open.
    Open,
    /// Closed at a message boundary.
    Clean,
    /// Closed inside a head (`head`) or a body (`!head`).
    Truncated { head: bool },
    /// Bytes no strict origin accepts, and why.
    Malformed(String),
}

/// Everything one connection brought.
#[derive(Clone, Debug)]
pub struct Connection {
    pub bytes: Vec<u8>,
    /// Requests parsed whole.
    pub requests: Vec<Parsed>,
    pub end: End,
}

type Log = Arc<Mutex<Connection>>;

/// The origin's record, shared with its threads.
#[derive(Clone, Default)]
pub struct Origin {
    connections: Arc<Mutex<Vec<Log>>>,
    stop: Arc<AtomicBool>,
}

impl Origin {
    /// Serves `listener` (bounded to five minutes) until [`Origin::stop`].
    pub fn serve(listener: TcpListener) -> Origin {
        let origin = Origin::default();
        let serving = origin.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            while !serving.stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let Ok(Some((stream, _))) =
                    tcp::accept_within(&listener, Duration::from_millis(100))
                else {
                    continue;
                };
                let log = Arc::new(Mutex::new(Connection {
                    bytes: Vec::new(),
                    requests: Vec::new(),
                    end: End::Open,
                }));
                serving.connections.lock().unwrap().push(log.clone());
                std::thread::spawn(move || serve_connection(stream, &log));
            }
        });
        origin
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// How many connections were accepted so far.
    pub fn accepted(&self) -> usize {
        self.connections.lock().unwrap().len()
    }

    /// Snapshots of the connections accepted from index `from` on.
    pub fn since(&self, from: usize) -> Vec<Connection> {
        self.connections.lock().unwrap()[from..]
            .iter()
            .map(|c| c.lock().unwrap().clone())
            .collect()
    }
}

fn serve_connection(mut stream: TcpStream, log: &Log) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // Parse everything complete in the buffer.
        loop {
            match parse(&buf) {
                Step::Need { head } => {
                    log.lock().unwrap().end = if buf.is_empty() {
                        End::Open
                    } else {
                        End::Truncated { head }
                    };
                    break;
                }
                Step::Done(request, used) => {
                    buf.drain(..used);
                    let close = request
                        .headers
                        .iter()
                        .any(|(n, v)| n.eq_ignore_ascii_case("connection") && v == "close");
                    let answer = {
                        let mut l = log.lock().unwrap();
                        l.requests.push(request);
                        l.end = End::Open;
                        format!("origin-{}", l.requests.len())
                    };
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if stream.write_all(response.as_bytes()).is_err() || close {
                        let mut l = log.lock().unwrap();
                        l.end = End::Clean;
                        return;
                    }
                }
                Step::Bad(why) => {
                    log.lock().unwrap().end = End::Malformed(why);
                    let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    return;
                }
            }
        }
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => {
                let mut l = log.lock().unwrap();
                if l.end == End::Open {
                    l.end = End::Clean;
                }
                return;
            }
            Ok(n) => n,
        };
        log.lock().unwrap().bytes.extend_from_slice(&chunk[..n]);
        buf.extend_from_slice(&chunk[..n]);
    }
}

enum Step {
    /// More bytes needed, inside a head or a body.
    Need {
        head: bool,
    },
    /// A request, and how many bytes it took.
    Done(Parsed, usize),
    Bad(String),
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses one request off the front of `buf`, strictly.
fn parse(buf: &[u8]) -> Step {
    let bad = |why: &str| Step::Bad(why.to_owned());
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        // Even incomplete, some bytes are already wrong.
        if buf.starts_with(b"\r") || buf.starts_with(b"\n") {
            return bad("an empty line before the request line");
        }
        return Step::Need { head: true };
    };
    let head = &buf[..head_end];
    if head.contains(&0) {
        return bad("a NUL in the head");
    }
    let mut lines = Vec::new();
    let mut rest = head;
    loop {
        match rest.windows(2).position(|w| w == b"\r\n") {
            Some(i) => {
                lines.push(&rest[..i]);
                rest = &rest[i + 2..];
            }
            None => {
                lines.push(rest);
                break;
            }
        }
    }
    if lines
        .iter()
        .any(|l| l.contains(&b'\r') || l.contains(&b'\n'))
    {
        return bad("a bare CR or LF in the head");
    }
    let request_line = lines[0];
    let words: Vec<&[u8]> = request_line.split(|&b| b == b' ').collect();
    if words.len() != 3 {
        return bad("a request line that is not three words split by single spaces");
    }
    let (method, target, version) = (words[0], words[1], words[2]);
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return bad("a method that is not a token");
    }
    if target.is_empty() || !target.iter().all(|&b| (0x21..0x7f).contains(&b)) {
        return bad("a target that is not visible ASCII");
    }
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return bad("a version other than HTTP/1.1 or HTTP/1.0");
    }
    let mut headers = Vec::new();
    for line in &lines[1..] {
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            return bad("obs-fold");
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return bad("a header line without a colon");
        };
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return bad("a header name that is not a token (whitespace before the colon?)");
        }
        let value = line[colon + 1..].trim_ascii();
        if value.iter().any(|&b| b < 0x20 && b != b'\t' || b == 0x7f) {
            return bad("a control byte in a header value");
        }
        headers.push((
            String::from_utf8_lossy(name).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    let mut parsed = Parsed {
        method: String::from_utf8_lossy(method).into_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
        headers,
        body: Vec::new(),
    };
    let cl = parsed.values("content-length");
    let te = parsed.values("transfer-encoding");
    if !cl.is_empty() && !te.is_empty() {
        return bad("both Content-Length and Transfer-Encoding");
    }
    let body_start = head_end + 4;
    let body = &buf[body_start..];
    if !te.is_empty() {
        if te.len() != 1 || !te[0].eq_ignore_ascii_case("chunked") || version != b"HTTP/1.1" {
            return bad("a Transfer-Encoding other than one chunked in HTTP/1.1");
        }
        return match dechunk(body) {
            Chunked::Need => Step::Need { head: false },
            Chunked::Bad(why) => Step::Bad(why),
            Chunked::Done(data, used) => {
                parsed.body = data;
                Step::Done(parsed, body_start + used)
            }
        };
    }
    let len = match cl.as_slice() {
        [] => 0,
        [one] if !one.is_empty() && one.bytes().all(|b| b.is_ascii_digit()) && one.len() < 16 => {
            one.parse::<usize>().unwrap()
        }
        _ => return bad("a Content-Length that is not one number"),
    };
    if body.len() < len {
        return Step::Need { head: false };
    }
    parsed.body = body[..len].to_vec();
    Step::Done(parsed, body_start + len)
}

enum Chunked {
    Need,
    Bad(String),
    Done(Vec<u8>, usize),
}

/// Decodes a chunked body strictly: hex sizes of at most 8 digits, no extensions,
/// CRLF after each chunk, no trailers.
fn dechunk(body: &[u8]) -> Chunked {
    let mut data = Vec::new();
    let mut at = 0;
    loop {
        let Some(eol) = body[at..].windows(2).position(|w| w == b"\r\n") else {
            return Chunked::Need;
        };
        let size = &body[at..at + eol];
        if size.is_empty() || size.len() > 8 || !size.iter().all(u8::is_ascii_hexdigit) {
            return Chunked::Bad(format!(
                "a chunk size line {:?}",
                String::from_utf8_lossy(size)
            ));
        }
        let n = usize::from_str_radix(std::str::from_utf8(size).unwrap(), 16).unwrap();
        at += eol + 2;
        if n == 0 {
            return match body.get(at..at + 2) {
                None => Chunked::Need,
                Some(b"\r\n") => Chunked::Done(data, at + 2),
                Some(_) => Chunked::Bad("trailers or junk after the last chunk".into()),
            };
        }
        if body.len() < at + n + 2 {
            return Chunked::Need;
        }
        data.extend_from_slice(&body[at..at + n]);
        if &body[at + n..at + n + 2] != b"\r\n" {
            return Chunked::Bad("no CRLF after chunk data".into());
        }
        at += n + 2;
    }
}
