//! A typed channel over a byte stream: `Sender<T>` writes frames of `T`,
//! `Receiver<T>` reads them. [`handshake`] opens one over a Unix stream.

use crate::frame::{self, FrameError, ReadState};
use crate::message::{Hello, MAGIC, PROTOCOL_VERSION, Role};
use serde::{Serialize, de::DeserializeOwned};
use std::marker::PhantomData;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

pub struct Sender<T, W = OwnedWriteHalf> {
    io: W,
    buf: Vec<u8>,
    _msg: PhantomData<fn(T)>,
}

impl<T: Serialize, W: AsyncWrite + Unpin> Sender<T, W> {
    pub fn new(io: W) -> Self {
        Sender {
            io,
            buf: Vec::new(),
            _msg: PhantomData,
        }
    }

    /// Encodes and writes one frame. Not cancel safe: dropping the future may
    /// leave half a frame on the stream, after which the connection is only
    /// good for closing. Do not race `send` in a `select!`.
    pub async fn send(&mut self, msg: &T) -> Result<(), FrameError> {
        frame::encode_into(msg, &mut self.buf)?;
        frame::write_frame(&mut self.io, &self.buf).await?;
        // Do not keep a restore-sized buffer around forever.
        if self.buf.capacity() > 4 << 20 {
            self.buf = Vec::new();
        }
        Ok(())
    }
}

pub struct Receiver<T, R = BufReader<OwnedReadHalf>> {
    io: R,
    buf: Vec<u8>,
    /// Progress of a frame whose `recv` was dropped before it completed.
    state: ReadState,
    _msg: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned, R: AsyncRead + Unpin> Receiver<T, R> {
    pub fn new(io: R) -> Self {
        Receiver {
            io,
            buf: Vec::new(),
            state: ReadState::default(),
            _msg: PhantomData,
        }
    }

    /// The next message; `FrameError::Closed` at a clean end of stream.
    ///
    /// Cancel safe: if the future is dropped mid-frame (a `select!` branch
    /// that lost), the next call resumes that frame.
    pub async fn recv(&mut self) -> Result<T, FrameError> {
        self.state.read_payload(&mut self.io, &mut self.buf).await?;
        let msg = frame::decode(&self.buf);
        if self.buf.capacity() > 4 << 20 {
            self.buf = Vec::new();
        }
        msg
    }
}

/// Exchanges hellos on a fresh stream and checks the peer's magic, version and
/// role. Returns the typed halves and the peer's hello.
pub async fn handshake<Out: Serialize, In: DeserializeOwned>(
    stream: UnixStream,
    me: Role,
    peer: Role,
) -> Result<(Sender<Out>, Receiver<In>, Hello), FrameError> {
    let (r, w) = stream.into_split();
    let mut hello_tx = Sender::<Hello>::new(w);
    let mut hello_rx = Receiver::<Hello>::new(BufReader::new(r));
    hello_tx.send(&Hello::new(me)).await?;
    let theirs = hello_rx.recv().await?;
    check_hello(&theirs, peer)?;
    Ok((Sender::new(hello_tx.io), Receiver::new(hello_rx.io), theirs))
}

fn check_hello(hello: &Hello, expected: Role) -> Result<(), FrameError> {
    if hello.magic != MAGIC {
        return Err(FrameError::BadMagic);
    }
    if hello.version != PROTOCOL_VERSION {
        return Err(FrameError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: hello.version,
        });
    }
    if hello.role != expected {
        return Err(FrameError::UnexpectedRole {
            expected,
            got: hello.role,
        });
    }
    Ok(())
}

impl<T, W: AsyncWrite + Unpin> Sender<T, W> {
    /// Writes a frame encoded earlier with [`crate::frame::encode_into`]
    /// (so one encoding can be sent several times, e.g. on replay).
    pub async fn send_encoded(&mut self, frame: &[u8]) -> Result<(), FrameError> {
        frame::write_frame(&mut self.io, frame).await
    }
}
