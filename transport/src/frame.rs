//! How a call travels on a QUIC stream: QUIC has no notion of a call, so failback frames one.
//!
//! - one bidirectional stream per call, opened by the client;
//! - the client writes one `QuicRequest` (the token and one request), length-delimited: a
//!   protobuf varint length then the message, and finishes its side;
//! - the server writes `QuicReply` messages, length-delimited (one for a unary call, one per
//!   item for a streaming call) and finishes; a failure is a last `QuicReply` carrying a
//!   `QuicStatus` with the gRPC status code, so the client maps errors the same way whatever
//!   the transport.

use failback_proto::v1::{QuicReply, QuicStatus, quic_reply};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt};
use tonic::{Code, Status};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("a frame of {len} bytes is over the limit of {max}")]
    TooLarge { len: u64, max: usize },
    #[error("the stream ended inside a frame")]
    Truncated,
    #[error("the frame length is not a valid varint")]
    BadLength,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads one length-delimited frame; `None` when the stream ends cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = 0u64;
    for i in 0..10 {
        let mut b = [0u8; 1];
        if r.read(&mut b).await? == 0 {
            return if i == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        len |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            if len > max as u64 {
                return Err(FrameError::TooLarge { len, max });
            }
            let mut buf = vec![0u8; len as usize];
            return match r.read_exact(&mut buf).await {
                Ok(_) => Ok(Some(buf)),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    Err(FrameError::Truncated)
                }
                Err(e) => Err(e.into()),
            };
        }
    }
    Err(FrameError::BadLength)
}

/// Writes one message as a length-delimited frame.
pub async fn write_frame(
    send: &mut quinn::SendStream,
    msg: &impl Message,
) -> Result<(), quinn::WriteError> {
    send.write_all(&msg.encode_length_delimited_to_vec()).await
}

/// A status as the last reply of a stream.
pub fn status_reply(s: &Status) -> QuicReply {
    QuicReply {
        reply: Some(quic_reply::Reply::Error(QuicStatus {
            code: s.code() as i32,
            message: s.message().to_string(),
        })),
    }
}

/// The status a `QuicStatus` carries (an unknown code is `Unknown`).
pub fn reply_status(s: QuicStatus) -> Status {
    Status::new(Code::from_i32(s.code), s.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_refuse_what_is_wrong() {
        let msg = QuicReply {
            reply: Some(quic_reply::Reply::Error(QuicStatus {
                code: 3,
                message: "x".repeat(300),
            })),
        };
        let bytes = msg.encode_length_delimited_to_vec();
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes);
        let mut r = &two[..];
        for _ in 0..2 {
            let f = read_frame(&mut r, 1000).await.unwrap().unwrap();
            assert_eq!(QuicReply::decode(&f[..]).unwrap(), msg);
        }
        assert!(read_frame(&mut r, 1000).await.unwrap().is_none());
        let mut r = &bytes[..];
        assert!(matches!(
            read_frame(&mut r, 100).await,
            Err(FrameError::TooLarge { max: 100, .. })
        ));
        let mut r = &bytes[..bytes.len() - 1];
        assert!(matches!(
            read_frame(&mut r, 1000).await,
            Err(FrameError::Truncated)
        ));
        let mut r = &[0xffu8; 12][..];
        assert!(matches!(
            read_frame(&mut r, 1000).await,
            Err(FrameError::BadLength)
        ));
        let s = Status::permission_denied("no");
        let back = match status_reply(&s).reply {
            Some(quic_reply::Reply::Error(q)) => reply_status(q),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            (back.code(), back.message()),
            (Code::PermissionDenied, "no")
        );
    }
}
