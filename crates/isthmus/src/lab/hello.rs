//! The built-in stand-in for the image `nginxdemos/hello:plain-text`: an HTTP/1.1
//! server that answers every request with the text that image serves (server
//! address, server name, date, URI, request id) and logs an access line.
//!
//! It runs as `isthmus lab hello` inside a pod's namespace and binds `0.0.0.0`: the
//! sidecar delivers inbound connections to the app at the pod's address (on
//! `127.0.0.1` for a pod that opted in to loopback delivery), and unmeshed pods
//! reach it there directly. One request per connection (`Connection:
//! close`), which is all the image's users rely on. Not a general web server.

use std::io::Read as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use k8s_openapi::jiff::Timestamp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The largest request head read; more is answered 431.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves on `0.0.0.0:port` until killed; `name` is the pod's name, `address` the
/// pod's IP, shown instead of loopback for connections delivered over loopback.
pub async fn serve(port: u16, name: String, address: Option<IpAddr>) -> Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
        .await
        .with_context(|| format!("binding 0.0.0.0:{port}"))?;
    println!("hello: listening on 0.0.0.0:{port} as {name}");
    loop {
        let (stream, peer) = listener.accept().await.context("accepting")?;
        let name = name.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, peer, &name, address).await {
                eprintln!("hello: {peer}: {e:#}");
            }
        });
    }
}

async fn handle(
    mut stream: TcpStream,
    peer: SocketAddr,
    name: &str,
    address: Option<IpAddr>,
) -> Result<()> {
    let mut head = Vec::with_capacity(1024);
    let complete = tokio::time::timeout(HEAD_TIMEOUT, async {
        let mut buf = [0u8; 2048];
        loop {
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .context("no request head within 10s")?
    .context("reading the request")?;
    let text = String::from_utf8_lossy(&head);
    let request_line = text.lines().next().unwrap_or_default().to_owned();
    let mut parts = request_line.split_whitespace();
    let (method, uri) = (parts.next().unwrap_or("-"), parts.next().unwrap_or("/"));
    let user_agent = text
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("user-agent"))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "-".to_owned());
    if !complete {
        stream
            .write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await?;
        return Ok(());
    }
    let local = stream.local_addr().context("local address")?;
    let shown = match (local.ip().is_loopback(), address) {
        (true, Some(ip)) => SocketAddr::new(ip, local.port()),
        _ => local,
    };
    let now = SystemTime::now();
    let body = format!(
        "Server address: {shown}\nServer name: {name}\nDate: {}\nURI: {uri}\nRequest ID: {}\n",
        nginx_date(now),
        request_id()
    );
    let response = format!(
        "HTTP/1.1 200 OK\r\nServer: isthmus-lab-hello\r\nDate: {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\nExpires: {}\r\nCache-Control: no-cache\r\n\r\n{}",
        http_date(now),
        body.len(),
        http_date(now),
        if method == "HEAD" { "" } else { &body }
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    println!(
        "{} - - [{}] \"{request_line}\" 200 {} \"-\" \"{user_agent}\"",
        peer.ip(),
        nginx_date(now),
        body.len()
    );
    Ok(())
}

/// 32 hex digits from the kernel's random source, as nginx's `$request_id`.
fn request_id() -> String {
    let mut bytes = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        // Unique enough for a log correlation id without the random source.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        bytes = (nanos ^ u128::from(std::process::id())).to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `t` in UTC through `strftime`; a time the calendar cannot hold reads as the epoch.
fn utc(t: SystemTime, format: &str) -> String {
    let t = Timestamp::try_from(t).unwrap_or(Timestamp::UNIX_EPOCH);
    t.strftime(format).to_string()
}

/// nginx's `$time_local` in UTC: `23/Nov/2026:20:10:24 +0000`.
pub fn nginx_date(t: SystemTime) -> String {
    utc(t, "%d/%b/%Y:%H:%M:%S +0000")
}

/// An HTTP date: `Mon, 23 Nov 2026 20:10:24 GMT`.
fn http_date(t: SystemTime) -> String {
    utc(t, "%a, %d %b %Y %H:%M:%S GMT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_formatted_like_nginx() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_464_624);
        assert_eq!(nginx_date(t), "23/Nov/2026:20:10:24 +0000");
        assert_eq!(http_date(t), "Mon, 23 Nov 2026 20:10:24 GMT");
        assert_eq!(nginx_date(UNIX_EPOCH), "01/Jan/1970:00:00:00 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(nginx_date(leap), "29/Feb/2000:00:00:00 +0000");
    }

    #[test]
    fn request_ids_are_32_hex_digits_and_differ() {
        let (a, b) = (request_id(), request_id());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    /// Bounds every await of the test at once.
    #[tokio::test]
    async fn answers_like_the_image() {
        tokio::time::timeout(Duration::from_secs(20), answers_like_the_image_inner())
            .await
            .expect("the test finishes within 20 s");
    }

    async fn answers_like_the_image_inner() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, peer) = listener.accept().await.unwrap();
            handle(s, peer, "hello-abc-0", "198.18.1.10".parse().ok())
                .await
                .unwrap();
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /x?y=1 HTTP/1.1\r\nHost: h\r\nUser-Agent: t\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        let body = out.split("\r\n\r\n").nth(1).unwrap();
        let lines: Vec<&str> = body.lines().collect();
        assert_eq!(
            lines[0],
            format!("Server address: 198.18.1.10:{}", addr.port())
        );
        assert_eq!(lines[1], "Server name: hello-abc-0");
        assert!(lines[2].starts_with("Date: ") && lines[2].ends_with(" +0000"));
        assert_eq!(lines[3], "URI: /x?y=1");
        assert!(lines[4].starts_with("Request ID: ") && lines[4].len() == 12 + 32);
    }
}
