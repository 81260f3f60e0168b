//! failback-transport: what both ends of a failbackd connection share below the protocol.
//!
//! - [`url`]: the URL that names a failbackd and picks the transport.
//! - [`tune`]: flow-control windows, QUIC's congestion control and keep-alives, and socket
//!   buffers, chosen for long fat links on both ends alike.
//! - [`tls`]: TLS 1.3 for both transports, from an operator's PEM files: how a client trusts
//!   failbackd (a CA, a pinned certificate, a fingerprint) and what a failed handshake says.
//! - [`frame`]: how one call travels on a QUIC stream.
//!
//! The messages themselves, their limits and the capability names are the protocol's
//! (`failback-proto`); what the server answers and what the client asks are theirs.

pub mod frame;
pub mod tls;
pub mod tune;
pub mod url;
