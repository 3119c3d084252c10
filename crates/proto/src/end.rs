//! How a flow's tunnel stream ends "delivered, then broken" (decisions 72 and 78).
//!
//! A flow cut short on one side must reach the other as a reset, not as a clean end: a program reading a raw
//! stream or a body without length cannot otherwise tell a cut-short one from a whole one. But a QUIC reset drops
//! what its receiver has not read yet, and what was sent before the break was counted and must arrive. So the side
//! where the flow broke first refuses the rest of the other direction with a code of its own
//! ([`TunnelRead::refuse`], QUIC's STOP_SENDING), then ends its sending half with a FIN after everything; the
//! receiver, at that end, looks at whether its own sending half was refused with the code
//! ([`TunnelWrite::refused`]) and if so resets its socket after what arrived. The refusal goes out before the FIN,
//! and quinn writes control frames ahead of stream data in a packet, so it has arrived by the time the end is read
//! (unless the packet that carried it was lost). yamux cannot carry a refusal, but a yamux reset arrives after the
//! data written before it, so there the side resets its stream instead.

use std::future::Future;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// Resolves once the peer refused the rest of a stream with the code asked for.
pub type Refused = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The receiving half of a tunnel stream.
pub trait TunnelRead: AsyncRead + Send + Unpin {
    /// Refuse the rest of what the peer sends on this stream, telling it `code`; true when that reaches the peer
    /// (QUIC). False where the transport cannot carry it (yamux: reset the stream instead), or when the peer's side
    /// has already ended and been read.
    fn refuse(&mut self, code: u32) -> bool {
        let _ = code;
        false
    }
}

/// The sending half of a tunnel stream.
pub trait TunnelWrite: AsyncWrite + Send + Unpin {
    /// Resolves once the peer has refused the rest of this stream with `code`. Take it when the stream opens; it
    /// never resolves on yamux.
    fn refused(&self, code: u32) -> Refused {
        let _ = code;
        Box::pin(std::future::pending())
    }
}

/// [`TunnelWrite::refused`] for a QUIC sending half.
#[cfg(feature = "quic")]
pub fn quic_refused(s: &quinn::SendStream, code: u32) -> Refused {
    let stopped = s.stopped();
    Box::pin(async move {
        match stopped.await {
            Ok(Some(c)) if c == code.into() => {}
            _ => std::future::pending().await,
        }
    })
}

#[cfg(feature = "quic")]
impl TunnelRead for quinn::RecvStream {
    fn refuse(&mut self, code: u32) -> bool {
        // A stream whose end has arrived has nothing left to refuse: quinn still takes the stop, but the peer has
        // freed its finished half and ignores it (session 16's review found the end then read as clean). So what
        // is buffered is read first, without waiting (it could go nowhere anyway), to see whether the end is there.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        loop {
            let mut read = std::pin::pin!(self.read_chunk(usize::MAX, true));
            match read.as_mut().poll(&mut cx) {
                std::task::Poll::Ready(Ok(Some(_))) => {}
                // Ended (or reset, or the tunnel is gone): the caller resets instead.
                std::task::Poll::Ready(_) => return false,
                std::task::Poll::Pending => break,
            }
        }
        self.stop(code.into()).is_ok()
    }
}

#[cfg(feature = "quic")]
impl TunnelWrite for quinn::SendStream {
    fn refused(&self, code: u32) -> Refused {
        quic_refused(self, code)
    }
}

impl TunnelRead for crate::mux::MuxRead {}
impl TunnelWrite for crate::mux::MuxWrite {}

/// In-memory streams' halves (tests drive flows over them): they have no refusal to carry.
impl<T: AsyncRead + Send> TunnelRead for tokio::io::ReadHalf<T> {}
impl<T: AsyncWrite + Send> TunnelWrite for tokio::io::WriteHalf<T> {}

impl<T: TunnelRead + ?Sized> TunnelRead for Box<T> {
    fn refuse(&mut self, code: u32) -> bool {
        (**self).refuse(code)
    }
}

impl<T: TunnelWrite + ?Sized> TunnelWrite for Box<T> {
    fn refused(&self, code: u32) -> Refused {
        (**self).refused(code)
    }
}
