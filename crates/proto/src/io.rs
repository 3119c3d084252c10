//! Byte-stream helpers for relaying: the copy buffer every flow direction uses ([`CopyBuf`], [`copy`]), the
//! read-ahead under the tunnel's TLS-over-TCP fallback ([`ReadAhead`]) and the close that keeps a flow's last
//! bytes ([`close_delivered`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// A flow direction's first copy buffer, bytes.
pub const COPY_MIN: usize = 8 * 1024;
/// The most a flow direction's copy buffer grows to, bytes.
pub const COPY_MAX: usize = 64 * 1024;

/// The copy buffer of one flow direction: it starts at [`COPY_MIN`] and doubles, up to [`COPY_MAX`], after each
/// read that filled it.
///
/// A fast flow reaches full-size reads after three (fewer, larger reads and writes), while the many flows that
/// stay idle or carry small requests and answers (a browser keeps dozens open through its proxy) hold 8 KiB per
/// direction instead of 64. It never shrinks: a flow that once moved bulk data keeps its buffer until it ends.
pub struct CopyBuf {
    buf: Vec<u8>,
    len: usize,
}

impl Default for CopyBuf {
    fn default() -> Self {
        CopyBuf {
            buf: vec![0; COPY_MIN],
            len: 0,
        }
    }
}

impl CopyBuf {
    /// Read once from `r`, replacing what the buffer held; the count read, 0 at end of stream. Cancel-safe when
    /// `r`'s reads are (nothing is read unless it returns).
    pub async fn read_from<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        r: &mut R,
    ) -> io::Result<usize> {
        if self.len == self.buf.len() && self.buf.len() < COPY_MAX {
            self.buf = vec![0; (self.buf.len() * 2).min(COPY_MAX)];
        }
        self.len = 0;
        self.len = r.read(&mut self.buf).await?;
        Ok(self.len)
    }

    /// The bytes the last read returned.
    pub fn data(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The buffer's size, bytes.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }
}

/// Which side of a [`copy`] failed.
#[derive(Debug)]
pub enum CopyError {
    /// Reading the source failed (it was reset, or its tunnel is gone).
    Read(io::Error),
    /// Writing to the destination failed (it stopped taking bytes: reset, or stopped reading).
    Write(io::Error),
}

/// Copy `r` to `w` until `r` ends, through a [`CopyBuf`]; the count copied. `w` is not shut down.
pub async fn copy<R, W>(r: &mut R, w: &mut W) -> Result<u64, CopyError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = CopyBuf::default();
    let mut total = 0u64;
    loop {
        let n = buf.read_from(r).await.map_err(CopyError::Read)?;
        if n == 0 {
            w.flush().await.map_err(CopyError::Write)?;
            return Ok(total);
        }
        w.write_all(buf.data()).await.map_err(CopyError::Write)?;
        total += n as u64;
    }
}

/// How often [`close_delivered`] first looks at what the peer has acknowledged; the wait doubles up to
/// [`DELIVERY_POLL_MAX`].
const DELIVERY_POLL: Duration = Duration::from_millis(5);
const DELIVERY_POLL_MAX: Duration = Duration::from_millis(80);
/// With `discard_input`, how long the peer must have sent nothing before the socket may close with everything
/// acknowledged: a peer that keeps sending is waited for until it closes (or the grace ends), so that the close
/// is not a reset arriving on top of data it has not read yet (some systems drop that data on a reset).
const INPUT_QUIET: Duration = Duration::from_millis(50);

/// End a TCP connection without throwing away what was written to it.
///
/// Closing a socket that still holds unread input makes the kernel answer with a reset and drop the output it has
/// not sent yet. So when a flow ends while its peer is still sending (an upload racing the cut-off, a target that
/// keeps talking, a client that sent its next request), the last bytes written to it, counted and paid for,
/// would never arrive. This half-closes (a FIN after the queued output), then waits, at most `grace`, until the
/// peer has acknowledged everything or has closed its side too.
///
/// With `discard_input` it reads and drops what the peer sends meanwhile, and closes once the peer has closed too,
/// or has acknowledged everything and sent nothing for [`INPUT_QUIET`]: then nothing is left unread and the close
/// is not a reset. Without, the peer's input stays unread (on a device, reading it would fetch bytes nobody pays
/// for over the mobile link) and the socket closes once everything was acknowledged, which may be a reset. After
/// `grace` the socket closes whatever the peer does.
pub async fn close_delivered(s: &tokio::net::TcpStream, grace: Duration, discard_input: bool) {
    let _ = socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write);
    let _ = tokio::time::timeout(grace, async {
        let mut last_input: Option<tokio::time::Instant> = None;
        let mut poll = DELIVERY_POLL;
        loop {
            if discard_input {
                match discard_pending(s) {
                    // The peer closed too (nothing is left unread), or reset (nothing more can be delivered).
                    None => return,
                    Some(true) => last_input = Some(tokio::time::Instant::now()),
                    Some(false) => {}
                }
            }
            let quiet = last_input.is_none_or(|t| t.elapsed() >= INPUT_QUIET);
            if crate::net::unacked_bytes(s) == Some(0) && quiet {
                return;
            }
            if discard_input {
                tokio::select! {
                    r = s.readable() => if r.is_err() { return },
                    _ = tokio::time::sleep(poll) => {}
                }
            } else {
                tokio::time::sleep(poll).await;
            }
            poll = (poll * 2).min(DELIVERY_POLL_MAX);
        }
    })
    .await;
}

/// End a TCP connection with a reset, after what was written to it has arrived: how a relay tells its peer that
/// the flow broke (a FIN would pass a cut-short answer off as complete). It waits while the peer keeps
/// acknowledging, for at most `grace` without progress and [`ABORT_MOST`] in all (a reset throws away what is still
/// queued, and that was charged). Sets a zero linger; the reset goes out when the caller drops the socket.
pub async fn abort_delivered(s: &tokio::net::TcpStream, grace: Duration) {
    let _ = tokio::time::timeout(ABORT_MOST, async {
        let mut poll = DELIVERY_POLL;
        let mut queued = crate::net::unacked_bytes(s);
        let mut progress = tokio::time::Instant::now();
        while queued.is_some_and(|n| n > 0) && progress.elapsed() < grace {
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(DELIVERY_POLL_MAX);
            let now = crate::net::unacked_bytes(s);
            if now < queued {
                progress = tokio::time::Instant::now();
            }
            queued = now;
        }
    })
    .await;
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// The longest [`abort_delivered`] waits for a peer that keeps acknowledging slowly.
pub const ABORT_MOST: Duration = Duration::from_secs(60);

/// Read and drop what the socket holds now: whether there was anything, or `None` once the peer closed or reset.
fn discard_pending(s: &tokio::net::TcpStream) -> Option<bool> {
    let mut scratch = [0u8; 4096];
    let mut got = false;
    loop {
        match s.try_read(&mut scratch) {
            Ok(0) => return None,
            Ok(_) => got = true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(got),
            Err(_) => return None,
        }
    }
}

/// How much [`ReadAhead`] asks the socket for at once.
pub const READ_AHEAD: usize = 64 * 1024;

/// Reads the socket under a TLS session in large chunks.
///
/// rustls asks its transport for little more than a record at a time (it grows its buffer 4 KiB per read), so a
/// fast flow over TLS costs about one `recvfrom` per 16 KiB record. Under the TLS layer this adapter reads up to
/// [`READ_AHEAD`] bytes per call and hands them out from memory. The buffer exists only while bytes arrive: it is
/// released as soon as the socket has nothing more to give, so an idle tunnel holds none of it. Writes pass
/// straight through.
///
/// It also counts the reads that brought bytes, so that the tunnel can tell a peer that went silent
/// ([`Hearing::silent_for`]).
pub struct ReadAhead<S> {
    inner: S,
    buf: BytesMut,
    heard: Hearing,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buf: BytesMut::new(),
            heard: Hearing::default(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// What this reader has heard from the socket, for a watchdog that outlives the reader's owner.
    pub fn hearing(&self) -> Hearing {
        self.heard.clone()
    }
}

/// How many reads of a [`ReadAhead`] brought bytes: one relaxed atomic add per socket read, no clock.
#[derive(Clone, Default)]
pub struct Hearing(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Hearing {
    fn heard(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Returns once nothing has arrived for `quiet` (noticed between `quiet` and 1.1 × `quiet` after the last
    /// bytes: it looks every tenth of `quiet`).
    pub async fn silent_for(&self, quiet: Duration) {
        let step = quiet / 10;
        let mut last = self.count();
        let mut since = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(step).await;
            let now = self.count();
            if now != last {
                last = now;
                since = tokio::time::Instant::now();
            } else if since.elapsed() >= quiet {
                return;
            }
        }
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
                let before = out.filled().len();
                let read = Pin::new(&mut this.inner).poll_read(cx, out);
                if out.filled().len() > before {
                    this.heard.heard();
                }
                return read;
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
                Poll::Ready(Ok(0)) => {}
                Poll::Ready(Ok(_)) => this.heard.heard(),
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

    /// What fits in the sockets is written while the peer sends without reading; then the socket is closed. The
    /// peer, reading only later, gets every byte and then the end of the stream — with `discard_input` (what the
    /// peer sent is read and dropped) and without (the close waits for the acknowledgements). Dropping the socket
    /// instead resets the connection and loses what was still queued.
    #[tokio::test]
    async fn a_close_delivers_what_was_queued_while_the_peer_is_still_sending() {
        async fn run(close: Option<bool>) -> (usize, usize) {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let peer = tokio::net::TcpStream::connect(l.local_addr().unwrap())
                .await
                .unwrap();
            let (ours, _) = l.accept().await.unwrap();
            let (mut pr, mut pw) = peer.into_split();
            // The peer keeps sending until the connection is gone.
            let sending = tokio::spawn(async move {
                let chunk = vec![7u8; 16 * 1024];
                while pw.write_all(&chunk).await.is_ok() {}
            });
            // Let some of it arrive, unread.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let block = vec![1u8; 64 * 1024];
            let mut sent = 0;
            loop {
                ours.writable().await.unwrap();
                match ours.try_write(&block) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            let closing = tokio::spawn(async move {
                if let Some(discard) = close {
                    close_delivered(&ours, Duration::from_secs(1), discard).await;
                }
                drop(ours);
            });
            // The peer starts reading only now.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut got = 0;
            let mut b = vec![0u8; 64 * 1024];
            while let Ok(n) = pr.read(&mut b).await {
                if n == 0 {
                    break;
                }
                got += n;
            }
            closing.await.unwrap();
            sending.await.unwrap();
            (sent, got)
        }
        for discard in [true, false] {
            let (sent, got) = run(Some(discard)).await;
            assert_eq!(got, sent, "discard_input = {discard}");
        }
        let (sent, got) = run(None).await;
        assert!(
            got < sent,
            "a plain drop lost nothing: the test shows nothing"
        );
    }

    /// Reads that fill the buffer grow it to the most, one doubling each; reads that do not leave it as it is.
    #[tokio::test]
    async fn the_copy_buffer_grows_only_while_reads_fill_it() {
        let (mut a, mut b) = tokio::io::duplex(1024 * 1024);
        let mut buf = CopyBuf::default();
        // Small exchanges (a request, an answer) keep the first size.
        for _ in 0..5 {
            b.write_all(&[1u8; 100]).await.unwrap();
            assert_eq!(buf.read_from(&mut a).await.unwrap(), 100);
            assert_eq!(buf.data(), &[1u8; 100][..]);
        }
        assert_eq!(buf.capacity(), COPY_MIN);
        // A bulk transfer: each full read doubles the next one, up to the most.
        b.write_all(&vec![2u8; 512 * 1024]).await.unwrap();
        let mut sizes = Vec::new();
        for _ in 0..6 {
            sizes.push(buf.read_from(&mut a).await.unwrap());
        }
        assert_eq!(
            sizes,
            [
                COPY_MIN,
                2 * COPY_MIN,
                4 * COPY_MIN,
                COPY_MAX,
                COPY_MAX,
                COPY_MAX
            ]
        );
        assert!(buf.data().iter().all(|&x| x == 2));
        drop(b);
        let mut rest = 512 * 1024 - sizes.iter().sum::<usize>();
        while rest > 0 {
            rest -= buf.read_from(&mut a).await.unwrap();
        }
        assert_eq!(buf.read_from(&mut a).await.unwrap(), 0, "end of stream");
        assert!(buf.data().is_empty());
        assert_eq!(buf.capacity(), COPY_MAX, "it never shrinks");
    }

    /// `copy` moves every byte in order and reports the count.
    #[tokio::test]
    async fn copy_moves_every_byte_in_order() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 13 % 251) as u8).collect();
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let (mut c, mut d) = tokio::io::duplex(64 * 1024);
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                b.write_all(&data).await.unwrap();
            })
        };
        let copier = tokio::spawn(async move {
            let n = copy(&mut a, &mut c).await.unwrap();
            drop(c);
            n
        });
        let mut got = Vec::new();
        d.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(copier.await.unwrap(), data.len() as u64);
        assert_eq!(got, data);
    }

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

    /// The silence watch returns only after `quiet` without a byte: bytes at 10 s push it back, reads of an idle
    /// socket do not count, and it then fires between 20 and 22 s after the last bytes.
    #[tokio::test(start_paused = true)]
    async fn silence_is_noticed_only_after_the_quiet_time_without_bytes() {
        use tokio::time::Instant;
        let (a, mut b) = tokio::io::duplex(1024);
        let mut r = ReadAhead::new(a);
        let hearing = r.hearing();
        tokio::spawn(async move {
            let mut chunk = [0u8; 64];
            while let Ok(1..) = r.read(&mut chunk).await {}
        });
        let start = Instant::now();
        let quiet = Duration::from_secs(20);
        let watch = tokio::spawn(async move {
            hearing.silent_for(quiet).await;
            Instant::now()
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        b.write_all(b"ping").await.unwrap();
        let fired = watch.await.unwrap() - start;
        assert!(
            fired >= Duration::from_secs(30) && fired <= Duration::from_secs(32),
            "{fired:?}"
        );
        drop(b);
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
