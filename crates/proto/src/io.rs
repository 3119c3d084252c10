//! Byte-stream adapters for the tunnel's TLS-over-TCP fallback.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much [`ReadAhead`] asks the socket for at once.
pub const READ_AHEAD: usize = 64 * 1024;

/// Reads the socket under a TLS session in large chunks.
///
/// rustls asks its transport for little more than a record at a time (it grows its buffer 4 KiB per read), so a
/// fast flow over TLS costs about one `recvfrom` per 16 KiB record. Under the TLS layer this adapter reads up to
/// [`READ_AHEAD`] bytes per call and hands them out from memory. The buffer exists only while bytes arrive: it is
/// released as soon as the socket has nothing more to give, so an idle tunnel holds none of it. Writes pass
/// straight through.
pub struct ReadAhead<S> {
    inner: S,
    buf: BytesMut,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buf: BytesMut::new(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            if out.remaining() >= READ_AHEAD {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            this.buf.reserve(READ_AHEAD);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Pending => {
                    // Nothing to read: give the memory back until the next burst.
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // End of stream: `buf` stays empty and so does `out`.
                Poll::Ready(Ok(_)) => {}
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        // Drained, the buffer is kept for the next read of this burst (`reserve` reuses it).
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Small reads see every byte in order, across bursts and an idle gap in between, then the end of stream.
    #[tokio::test]
    async fn small_reads_see_every_byte_in_order() {
        let (a, mut b) = tokio::io::duplex(1024 * 1024);
        let mut r = ReadAhead::new(a);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (first, second) = data.split_at(200_000);
        b.write_all(first).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while got.len() < first.len() {
            let n = r.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
        }
        // Drained and idle (the next read finds nothing): nothing held.
        let idle = tokio::time::timeout(std::time::Duration::from_millis(20), r.read(&mut chunk));
        assert!(idle.await.is_err(), "nothing to read yet");
        assert_eq!(r.buf.capacity(), 0);
        b.write_all(second).await.unwrap();
        drop(b);
        loop {
            let n = r.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
    }

    /// One read from the socket serves many small reads: the point of the adapter.
    #[tokio::test]
    async fn one_socket_read_serves_many_small_reads() {
        let (a, mut b) = tokio::io::duplex(1024 * 1024);
        let counting = Counting { inner: a, reads: 0 };
        let mut r = ReadAhead::new(counting);
        b.write_all(&[5u8; READ_AHEAD]).await.unwrap();
        let mut chunk = [0u8; 4096];
        for _ in 0..READ_AHEAD / chunk.len() {
            r.read_exact(&mut chunk).await.unwrap();
        }
        assert_eq!(r.get_ref().reads, 1);
        // A read as large as the read-ahead goes straight to the socket.
        b.write_all(&[6u8; READ_AHEAD]).await.unwrap();
        let mut big = vec![0u8; READ_AHEAD];
        let n = r.read(&mut big).await.unwrap();
        assert!(n > 0 && big[..n].iter().all(|&x| x == 6));
        assert_eq!(r.get_ref().reads, 2);
    }

    struct Counting<S> {
        inner: S,
        reads: usize,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let r = Pin::new(&mut this.inner).poll_read(cx, out);
            if r.is_ready() {
                this.reads += 1;
            }
            r
        }
    }
}
