//! The one place where a proxy failure becomes a status code and a metric label.

use pingora::{Error, ErrorSource, ErrorType};

/// The `kind` label of `cutover_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Connect = 0,
    Tls = 1,
    Timeout = 2,
    Reset = 3,
    Other = 4,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::Connect,
        ErrorKind::Tls,
        ErrorKind::Timeout,
        ErrorKind::Reset,
        ErrorKind::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Tls => "tls",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::Other => "other",
        }
    }

    /// The status a request gets when its upstream fails this way before
    /// any of the response reached the client: 504 for a timeout, else 502.
    pub fn status(self) -> u16 {
        if self == ErrorKind::Timeout {
            504
        } else {
            502
        }
    }

    pub fn of(e: &Error) -> ErrorKind {
        use ErrorType::*;
        match e.etype() {
            ConnectTimedout | TLSHandshakeTimedout | ReadTimedout | WriteTimedout => {
                ErrorKind::Timeout
            }
            ConnectRefused | ConnectNoRoute | ConnectError | BindError | SocketError => {
                ErrorKind::Connect
            }
            TLSHandshakeFailure | InvalidCert | HandshakeError | TLSWantX509Lookup => {
                ErrorKind::Tls
            }
            ConnectionClosed | ReadError | WriteError => ErrorKind::Reset,
            _ => ErrorKind::Other,
        }
    }
}

/// What the client is told when proxying fails.
pub enum Failure {
    /// The upstream side failed: count it, answer 502 or 504.
    Upstream {
        status: u16,
        kind: ErrorKind,
    },
    /// The client side failed or sent garbage: 400, or nothing if the connection is gone.
    Downstream {
        status: u16,
    },
    /// An explicit HTTP status raised by our own filters.
    Status(u16),
    Internal,
}

/// How a client stopped short of sending its request body whole: what
/// either carrier answers, from this one table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyStopped {
    /// Nothing arrived within the body timeout: 408.
    TimedOut,
    /// The client closed its side: nothing can reach it; logged as 499.
    Closed,
    /// A chunk that does not parse: 400, refused as bad framing.
    Malformed,
}

impl BodyStopped {
    pub fn status(self) -> u16 {
        match self {
            BodyStopped::TimedOut => 408,
            BodyStopped::Closed => 499,
            BodyStopped::Malformed => 400,
        }
    }
}

pub fn classify(e: &Error) -> Failure {
    if let ErrorType::HTTPStatus(code) = e.etype() {
        return Failure::Status(*code);
    }
    match e.esource() {
        ErrorSource::Upstream => {
            let kind = ErrorKind::of(e);
            Failure::Upstream {
                status: kind.status(),
                kind,
            }
        }
        ErrorSource::Downstream => match e.etype() {
            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                Failure::Downstream { status: 0 }
            }
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => Failure::Downstream {
                status: BodyStopped::TimedOut.status(),
            },
            _ => Failure::Downstream {
                status: BodyStopped::Malformed.status(),
            },
        },
        ErrorSource::Internal | ErrorSource::Unset => Failure::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_504_other_upstream_failures_502() {
        let timeout = Error::new_up(ErrorType::ReadTimedout);
        assert!(matches!(
            classify(&timeout),
            Failure::Upstream {
                status: 504,
                kind: ErrorKind::Timeout
            }
        ));
        let cert = Error::new_up(ErrorType::InvalidCert);
        assert!(matches!(
            classify(&cert),
            Failure::Upstream {
                status: 502,
                kind: ErrorKind::Tls
            }
        ));
        let refused = Error::new_up(ErrorType::ConnectRefused);
        assert!(matches!(
            classify(&refused),
            Failure::Upstream {
                status: 502,
                kind: ErrorKind::Connect
            }
        ));
        let gone = Error::new_down(ErrorType::ConnectionClosed);
        assert!(matches!(classify(&gone), Failure::Downstream { status: 0 }));
    }
}
