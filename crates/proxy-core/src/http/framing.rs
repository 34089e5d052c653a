//! What the HTTP path refuses that hyper would forward: request framing an origin
//! could read differently from the proxy, padded HTTP/2 field values, and broken
//! request bodies (which must be answered `400`, the client's fault, not `502`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, header};
use hyper::body::Incoming;

use super::clock::InFlight;

/// Framing hyper lets through but an origin may read differently: the request is
/// refused rather than forwarded.
///
/// hyper already refuses `Transfer-Encoding` in HTTP/1.0, one that does not end in
/// `chunked`, differing or malformed `Content-Length`s, whitespace before a colon,
/// obs-fold and bare CRs; it drops `Content-Length` beside `Transfer-Encoding` and
/// folds equal duplicates into one. What is left is a coding list that ends in
/// `chunked` but holds more (`gzip, chunked`, `chunked, chunked`, two field lines):
/// nginx takes `chunked` alone and answers the rest 501, and an origin that applies
/// `chunked` twice would read the re-chunked body differently from the proxy.
pub(super) fn h1_framing<B>(req: &Request<B>) -> Result<(), &'static str> {
    let headers = req.headers();
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    match (codings.next(), codings.next()) {
        (None, _) => {}
        (Some(only), None) if only.as_bytes().eq_ignore_ascii_case(b"chunked") => {
            if headers.contains_key(header::CONTENT_LENGTH) {
                return Err("both transfer-encoding and content-length");
            }
        }
        _ => return Err("a transfer-encoding other than a single chunked"),
    }
    if headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err("more than one content-length");
    }
    Ok(())
}

/// RFC 9113 §8.2.1: a field value with leading or trailing whitespace is malformed,
/// and an HTTP/1 origin behind an HTTP/2-to-1 hop could read it differently from the
/// proxy (`Transfer-Encoding: " chunked"`). h2 and hyper pass such values through.
pub(super) fn h2_fields<B>(req: &Request<B>) -> Result<(), &'static str> {
    let padded = |v: &header::HeaderValue| {
        let bytes = v.as_bytes();
        matches!(bytes.first(), Some(b' ' | b'\t')) || matches!(bytes.last(), Some(b' ' | b'\t'))
    };
    if req.headers().values().any(padded) {
        return Err("a field value with leading or trailing whitespace");
    }
    Ok(())
}

/// Set once the client's request body turned out broken, so that the upstream
/// failure that follows is answered as the client's fault.
#[derive(Clone, Debug, Default)]
pub(super) struct BodyFault(Arc<AtomicBool>);

impl BodyFault {
    pub(super) fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub(super) fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Trailer fields a client must not send (RFC 9110 §6.5.1: framing, routing,
/// request modifiers, authentication, content metadata). hyper drops them on the
/// way upstream; a client that sends them is refused instead, as nginx and Envoy
/// refuse smuggling-shaped input rather than repair it.
const FORBIDDEN_TRAILERS: &[header::HeaderName] = &[
    header::AUTHORIZATION,
    header::CACHE_CONTROL,
    header::CONNECTION,
    header::CONTENT_ENCODING,
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
    header::CONTENT_TYPE,
    header::COOKIE,
    header::EXPECT,
    header::HOST,
    header::IF_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_NONE_MATCH,
    header::IF_RANGE,
    header::IF_UNMODIFIED_SINCE,
    header::MAX_FORWARDS,
    header::PRAGMA,
    header::PROXY_AUTHORIZATION,
    header::RANGE,
    header::SET_COOKIE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The error a [`RequestBody`] ends with.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestBodyError {
    #[error("client request body is malformed")]
    Malformed(#[source] hyper::Error),
    #[error("client request trailers hold the forbidden field {0}")]
    ForbiddenTrailer(header::HeaderName),
}

/// An HTTP/1 request body on its way upstream that records in its [`BodyFault`]
/// when the client broke it, and refuses trailers with forbidden fields.
#[derive(Debug)]
pub(crate) struct RequestBody {
    pub(super) inner: InFlight<Incoming>,
    pub(super) fault: BodyFault,
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(polled) => polled,
        };
        let checked = match polled {
            None => None,
            Some(Err(e)) => Some(Err(RequestBodyError::Malformed(e))),
            Some(Ok(frame)) => {
                let forbidden = frame
                    .trailers_ref()
                    .and_then(|t| FORBIDDEN_TRAILERS.iter().find(|f| t.contains_key(*f)));
                match forbidden {
                    Some(name) => Some(Err(RequestBodyError::ForbiddenTrailer(name.clone()))),
                    None => Some(Ok(frame)),
                }
            }
        };
        if matches!(checked, Some(Err(_))) {
            this.fault.set();
        }
        Poll::Ready(checked)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(fields: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method("POST").uri("/");
        for (name, value) in fields {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn only_a_single_chunked_or_one_content_length_frames_a_request() {
        for ok in [
            &[][..],
            &[("transfer-encoding", "chunked")],
            &[("transfer-encoding", "CHUNKED")],
            &[("content-length", "5")],
        ] {
            assert_eq!(h1_framing(&request(ok)), Ok(()), "{ok:?}");
        }
        for bad in [
            &[("transfer-encoding", "gzip, chunked")][..],
            &[("transfer-encoding", "chunked, chunked")],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            &[("transfer-encoding", "chunked"), ("content-length", "5")],
            &[("content-length", "5"), ("content-length", "5")],
        ] {
            assert!(h1_framing(&request(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn padded_values_are_malformed_in_http2_inner_whitespace_is_not() {
        assert!(h2_fields(&request(&[("x", "a b\tc")])).is_ok());
        for padded in [" a", "a ", "\ta", "a\t"] {
            assert!(h2_fields(&request(&[("x", padded)])).is_err(), "{padded:?}");
        }
    }
}
