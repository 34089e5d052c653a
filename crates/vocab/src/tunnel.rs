//! The tunnel's wire contract beyond HTTP/2 itself: the header names and the
//! refusal reasons with the statuses that carry them.
//!
//! A tunnel stream is an HTTP/2 `CONNECT` whose `:authority` is an
//! [`Authority`](crate::Authority) and whose [`CLUSTER_HEADER`] names the target's
//! cluster; a refusal answers with [`Refusal::status`] and [`REFUSAL_HEADER`].

use http::StatusCode;

/// Request header naming the cluster of the target service.
pub const CLUSTER_HEADER: &str = "isthmus-cluster";
/// Response header naming the reason of a refusal (`not_exported`, `link_down`, ...).
pub const REFUSAL_HEADER: &str = "isthmus-refusal";
/// Request header on a stream that carries exactly one HTTP request, naming its
/// protocol ([`ONE_REQUEST_HTTP1`] or [`ONE_REQUEST_H2`]): the hop that picks the
/// endpoint may then read the response's status to score that endpoint. Absent on a
/// stream that carries a whole connection's bytes.
pub const ONE_REQUEST_HEADER: &str = "isthmus-one-request";
/// [`ONE_REQUEST_HEADER`] value: one HTTP/1.1 request and its response.
pub const ONE_REQUEST_HTTP1: &str = "http/1.1";
/// [`ONE_REQUEST_HEADER`] value: an HTTP/2 connection that carries one request.
pub const ONE_REQUEST_H2: &str = "h2";

/// Why a tunnel stream (or the connection that would carry it) was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The request was not a well-formed CONNECT for a service authority.
    BadRequest,
    /// The peer's identity is not allowed to use this route.
    Forbidden,
    /// The target service exists but its cluster does not export it.
    NotExported,
    /// No service of that name and port is known.
    NoRoute,
    /// The target names a cluster this gateway has no link to.
    UnknownCluster,
    /// The service exists but has no ready endpoints.
    NoEndpoints,
    /// The link to the target's cluster is down.
    LinkDown,
    /// The final upstream refused or reset the connection attempt.
    UpstreamRefused,
    /// The final upstream did not answer within the connect timeout.
    UpstreamTimeout,
    /// The target points back at a proxy listener.
    Loop,
}

impl Refusal {
    /// Every reason, for metrics that pre-register their labels and for tests.
    pub const ALL: [Refusal; 10] = [
        Refusal::BadRequest,
        Refusal::Forbidden,
        Refusal::NotExported,
        Refusal::NoRoute,
        Refusal::UnknownCluster,
        Refusal::NoEndpoints,
        Refusal::LinkDown,
        Refusal::UpstreamRefused,
        Refusal::UpstreamTimeout,
        Refusal::Loop,
    ];

    /// The status that carries this refusal on the tunnel.
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::BadRequest => StatusCode::BAD_REQUEST,
            Refusal::Forbidden | Refusal::NotExported => StatusCode::FORBIDDEN,
            Refusal::NoRoute | Refusal::UnknownCluster => StatusCode::NOT_FOUND,
            Refusal::NoEndpoints | Refusal::LinkDown => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::UpstreamRefused => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Refusal::Loop => StatusCode::LOOP_DETECTED,
        }
    }

    /// The reason as a metric label and [`REFUSAL_HEADER`] value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::Forbidden => "forbidden",
            Refusal::NotExported => "not_exported",
            Refusal::NoRoute => "no_route",
            Refusal::UnknownCluster => "unknown_cluster",
            Refusal::NoEndpoints => "no_endpoints",
            Refusal::LinkDown => "link_down",
            Refusal::UpstreamRefused => "upstream_refused",
            Refusal::UpstreamTimeout => "upstream_timeout",
            Refusal::Loop => "loop",
        }
    }

    /// Reads a refusal back from a response: the header when it names a known reason,
    /// else the best match for the status (a peer of another version, or a middlebox).
    pub fn from_response(status: StatusCode, header: Option<&[u8]>) -> Refusal {
        if let Some(found) = header.and_then(|h| {
            Refusal::ALL
                .into_iter()
                .find(|r| r.as_str().as_bytes() == h)
        }) {
            return found;
        }
        match status {
            StatusCode::BAD_REQUEST => Refusal::BadRequest,
            StatusCode::FORBIDDEN => Refusal::Forbidden,
            StatusCode::NOT_FOUND => Refusal::NoRoute,
            StatusCode::SERVICE_UNAVAILABLE => Refusal::LinkDown,
            StatusCode::GATEWAY_TIMEOUT => Refusal::UpstreamTimeout,
            StatusCode::LOOP_DETECTED => Refusal::Loop,
            _ => Refusal::UpstreamRefused,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_round_trip_through_the_wire() {
        for refusal in Refusal::ALL {
            let back = Refusal::from_response(refusal.status(), Some(refusal.as_str().as_bytes()));
            assert_eq!(back, refusal);
        }
        assert_eq!(
            Refusal::from_response(StatusCode::SERVICE_UNAVAILABLE, Some(b"nonsense")),
            Refusal::LinkDown
        );
    }

    #[test]
    fn statuses_without_a_header_read_back_as_the_closest_reason() {
        for (status, want) in [
            (StatusCode::BAD_REQUEST, Refusal::BadRequest),
            (StatusCode::FORBIDDEN, Refusal::Forbidden),
            (StatusCode::NOT_FOUND, Refusal::NoRoute),
            (StatusCode::SERVICE_UNAVAILABLE, Refusal::LinkDown),
            (StatusCode::GATEWAY_TIMEOUT, Refusal::UpstreamTimeout),
            (StatusCode::LOOP_DETECTED, Refusal::Loop),
            (StatusCode::BAD_GATEWAY, Refusal::UpstreamRefused),
            (StatusCode::INTERNAL_SERVER_ERROR, Refusal::UpstreamRefused),
        ] {
            assert_eq!(Refusal::from_response(status, None), want, "{status}");
        }
    }

    #[test]
    fn labels_are_distinct() {
        let labels: std::collections::HashSet<_> =
            Refusal::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), Refusal::ALL.len());
    }
}
