//! Length-prefixed bincode frames: a little-endian `u32` length, then the
//! payload. The length is checked against the maximum before the payload is
//! allocated, and bincode's own limit bounds what a payload may claim.

use bytes::BufMut;
use serde::{Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame either side accepts. Restores and flushes are chunked to stay
/// well below it.
pub const MAX_FRAME_BYTES: u32 = 64 << 20;
/// No message encodes to fewer bytes than this (an enum tag).
pub const MIN_FRAME_BYTES: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("peer closed the connection")]
    Closed,
    #[error("connection ended inside a frame ({got} of {expected} bytes)")]
    Truncated { got: usize, expected: usize },
    #[error("frame declares {len} bytes, above the maximum of {max}")]
    TooLarge { len: u32, max: u32 },
    #[error("frame declares {len} bytes, below the minimum of {MIN_FRAME_BYTES}")]
    Undersized { len: u32 },
    #[error("frame payload does not decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("frame payload has {0} bytes after the message")]
    TrailingBytes(usize),
    #[error("encoded product states: {declared} declared, {found} found")]
    CountMismatch { declared: usize, found: usize },
    #[error("message does not encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("handshake: peer is not an analytics process (bad magic)")]
    BadMagic,
    #[error("handshake: protocol version {theirs} does not match ours ({ours})")]
    VersionMismatch { ours: u32, theirs: u32 },
    #[error("handshake: expected a {expected:?} peer, got {got:?}")]
    UnexpectedRole {
        expected: crate::Role,
        got: crate::Role,
    },
    #[error("i/o on the frame stream: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// A closed or truncated stream means the peer is gone; everything else
    /// means the peer (or we) broke the protocol. Neither is retried on the
    /// same connection: the supervisor replaces the peer.
    pub fn is_peer_gone(&self) -> bool {
        matches!(self, FrameError::Closed | FrameError::Truncated { .. })
    }
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_FRAME_BYTES as usize }>()
}

/// Encodes a message as one frame (length prefix included) into `out`.
pub fn encode_into<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    out.clear();
    out.extend_from_slice(&[0; 4]);
    bincode::serde::encode_into_writer(msg, VecWriter(out), config())?;
    let len = out.len() - 4;
    let len = u32::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_FRAME_BYTES)
        .ok_or(FrameError::TooLarge {
            len: u32::try_from(len).unwrap_or(u32::MAX),
            max: MAX_FRAME_BYTES,
        })?;
    out[..4].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// One frame of `msg` (length prefix included) in a buffer of exactly its
/// size. A size pass first costs a walk over the message's fields, but no
/// byte is copied twice: encoding into a growing buffer copied a large
/// frame about once more on the way, into fresh pages each time (measured:
/// most of the supervisor's page faults).
pub fn encode_exact<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(msg, &mut size, config())?;
    let mut out = Vec::with_capacity(4 + size.bytes_written);
    encode_into(msg, &mut out)?;
    Ok(out)
}

/// Encodes a value as a frame's payload would hold it (no length prefix):
/// for values kept as bytes inside messages and stores.
pub fn encode_payload<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    bincode::serde::encode_into_writer(value, VecWriter(&mut out), config())?;
    if out.len() > MAX_FRAME_BYTES as usize {
        return Err(FrameError::TooLarge {
            len: u32::try_from(out.len()).unwrap_or(u32::MAX),
            max: MAX_FRAME_BYTES,
        });
    }
    Ok(out)
}

/// bincode's own writer interface on a `Vec`: its `std::io::Write` adapter
/// costs a call per field (measured: a quarter of the storage process).
struct VecWriter<'a>(&'a mut Vec<u8>);

impl bincode::enc::write::Writer for VecWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Checks a declared payload length before anything is allocated for it.
pub fn check_len(len: u32) -> Result<usize, FrameError> {
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_BYTES,
        });
    }
    if len < MIN_FRAME_BYTES {
        return Err(FrameError::Undersized { len });
    }
    Ok(len as usize)
}

/// Decodes one payload; every byte must belong to the message.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, used) = bincode::serde::decode_from_slice(payload, config())?;
    if used != payload.len() {
        return Err(FrameError::TrailingBytes(payload.len() - used));
    }
    Ok(msg)
}

/// Checks that a payload decodes as `T` (borrowing its strings, so
/// without allocating them); every byte must belong to the value.
pub fn check<'a, T: serde::Deserialize<'a>>(payload: &'a [u8]) -> Result<T, FrameError> {
    let (value, used) = bincode::serde::borrow_decode_from_slice(payload, config())?;
    if used != payload.len() {
        return Err(FrameError::TrailingBytes(payload.len() - used));
    }
    Ok(value)
}

/// Reads one frame's payload into `buf`. Not cancel safe on its own: a
/// caller that may drop the future mid-frame keeps a [`ReadState`] instead.
pub async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<(), FrameError> {
    ReadState::default().read_payload(r, buf).await
}

/// How far the current frame has been read. Kept by the reader across calls,
/// so that a read dropped mid-frame (the losing branch of a `select!`)
/// resumes where it stopped instead of taking payload bytes for a length.
#[derive(Debug, Default)]
pub struct ReadState {
    head: [u8; 4],
    head_got: usize,
    /// Declared payload length once the header is complete and checked
    /// (the payload read so far is what `buf` holds).
    body_len: Option<usize>,
}

impl ReadState {
    /// Reads (the rest of) one frame's payload into `buf`. Cancel safe when
    /// `buf` is the same buffer on every call until one returns: progress
    /// lives in `self` and `buf`, and each await is a single cancel-safe
    /// `read`. After any return, the next call starts a new frame.
    pub async fn read_payload<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        buf: &mut Vec<u8>,
    ) -> Result<(), FrameError> {
        let res = self.read_inner(r, buf).await;
        *self = ReadState::default();
        res
    }

    async fn read_inner<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        buf: &mut Vec<u8>,
    ) -> Result<(), FrameError> {
        while self.head_got < 4 {
            match r.read(&mut self.head[self.head_got..]).await? {
                0 if self.head_got == 0 => return Err(FrameError::Closed),
                0 => {
                    return Err(FrameError::Truncated {
                        got: self.head_got,
                        expected: 4,
                    });
                }
                n => self.head_got += n,
            }
        }
        let len = match self.body_len {
            Some(len) => len,
            None => {
                let len = check_len(u32::from_le_bytes(self.head))?;
                buf.clear();
                buf.reserve_exact(len);
                self.body_len = Some(len);
                len
            }
        };
        // Into the buffer's spare room: zeroing it first cost a pass over
        // every frame's bytes.
        while buf.len() < len {
            let want = len - buf.len();
            if r.read_buf(&mut (&mut *buf).limit(want)).await? == 0 {
                return Err(FrameError::Truncated {
                    got: buf.len(),
                    expected: len,
                });
            }
        }
        Ok(())
    }
}

/// Writes an encoded frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> Result<(), FrameError> {
    w.write_all(frame).await?;
    w.flush().await?;
    Ok(())
}
