//! The Workload API endpoint address, as `SPIFFE_ENDPOINT_SOCKET` carries it.
//!
//! Accepted forms (SPIFFE Workload Endpoint spec §4): `unix:///abs/path` and
//! `unix:/abs/path` for a Unix socket, `tcp://IP:port` for TCP (an IP
//! address, not a host name). Rejected: relative paths, any other scheme,
//! queries, fragments, userinfo.

use std::net::SocketAddr;
use std::path::PathBuf;

/// The environment variable every SPIFFE client reads.
pub const SPIFFE_ENDPOINT_SOCKET: &str = "SPIFFE_ENDPOINT_SOCKET";

/// Where the Workload API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix domain socket.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

/// Why an endpoint address is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The variable is not set.
    #[error("{SPIFFE_ENDPOINT_SOCKET} is not set")]
    NotSet,
    /// Neither `unix:` nor `tcp:`.
    #[error("workload endpoint scheme must be unix or tcp")]
    BadScheme,
    /// `unix:` with a relative or empty path, or with a host part.
    #[error("workload endpoint unix path must be absolute")]
    BadUnixPath,
    /// `tcp://` without an IP:port.
    #[error("workload endpoint tcp address must be IP:port")]
    BadTcpAddress,
    /// A query, fragment or userinfo.
    #[error("workload endpoint must not have a query, fragment or userinfo")]
    Extraneous,
}

impl Endpoint {
    /// Parses an endpoint address.
    pub fn parse(s: &str) -> Result<Self, EndpointError> {
        if s.contains(['?', '#', '@']) {
            return Err(EndpointError::Extraneous);
        }
        if let Some(rest) = s.strip_prefix("unix:") {
            // unix:///abs (empty authority) or unix:/abs.
            let path = match rest.strip_prefix("//") {
                Some(after) => after,
                None => rest,
            };
            if !path.starts_with('/') || path.len() < 2 {
                return Err(EndpointError::BadUnixPath);
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp://") {
            return rest
                .parse::<SocketAddr>()
                .map(Self::Tcp)
                .map_err(|_| EndpointError::BadTcpAddress);
        }
        Err(EndpointError::BadScheme)
    }

    /// Reads `SPIFFE_ENDPOINT_SOCKET` from the process environment.
    pub fn from_env() -> Result<Self, EndpointError> {
        match std::env::var(SPIFFE_ENDPOINT_SOCKET) {
            Ok(v) => Self::parse(&v),
            Err(_) => Err(EndpointError::NotSet),
        }
    }

    /// The canonical `unix:///…` / `tcp://…` form.
    pub fn to_uri(&self) -> String {
        match self {
            Self::Unix(p) => format!("unix://{}", p.display()),
            Self::Tcp(a) => format!("tcp://{a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let p = |s| Endpoint::parse(s);
        assert_eq!(
            p("unix:///tmp/a.sock"),
            Ok(Endpoint::Unix("/tmp/a.sock".into()))
        );
        assert_eq!(
            p("unix:/tmp/a.sock"),
            Ok(Endpoint::Unix("/tmp/a.sock".into()))
        );
        assert_eq!(
            p("tcp://127.0.0.1:8081"),
            Ok(Endpoint::Tcp("127.0.0.1:8081".parse().unwrap()))
        );
        assert_eq!(p("unix://tmp/a.sock"), Err(EndpointError::BadUnixPath));
        assert_eq!(p("unix:relative"), Err(EndpointError::BadUnixPath));
        assert_eq!(p("unix:///"), Err(EndpointError::BadUnixPath));
        assert_eq!(p("tcp://localhost:80"), Err(EndpointError::BadTcpAddress));
        assert_eq!(p("http://x"), Err(EndpointError::BadScheme));
        assert_eq!(p("/tmp/a.sock"), Err(EndpointError::BadScheme));
        assert_eq!(p("unix:///tmp/a?x"), Err(EndpointError::Extraneous));
        assert_eq!(Endpoint::Unix("/a".into()).to_uri(), "unix:///a");
    }
}
