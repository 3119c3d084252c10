//! A yamux stream split into a read and a write half that never lets its session stall.
//!
//! tokio-yamux (0.3) queues at most 8 frames per stream between the session and the stream, and a session with one
//! full queue stops reading its socket, for every stream. A stream's frames only leave that queue while the stream
//! is polled, so one flow whose reader is busy elsewhere (a customer that stopped reading: the relay waits on its
//! socket, not on the stream) froze the device's whole tunnel. Here a small task per stream moves the frames on
//! into the stream's own buffer whenever they arrive, without consuming them: yamux then grants the sender no more
//! window, so what waits is bounded by the stream window ([`crate::STREAM_WINDOW`]).
//!
//! The stream keeps one waker for frame arrivals, the last one polled with; every poll here passes one that wakes
//! all three parties (reader, writer, drainer), and each polls again what it waits for.
//!
//! yamux also ends every stream of a session that died (a silent peer) the way a FIN ends one, or leaves it
//! waiting for ever (a writer whose window is full, a reader with nothing buffered). Once the session's driver has
//! stopped (`session_done`), both halves are woken, the read half reports an end or a wait as an error and the
//! write half fails, so that a relay resets its flow at once instead of closing it as if it were complete or
//! holding it open. (A FIN that arrived just before the session died but is
//! read after it is taken for a break too: that flow is reset after all its bytes.)

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Wake, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tokio_yamux::StreamHandle;

#[derive(Default)]
struct Slot(Mutex<Option<Waker>>);

impl Slot {
    fn register(&self, w: &Waker) {
        let mut s = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !s.as_ref().is_some_and(|old| old.will_wake(w)) {
            *s = Some(w.clone());
        }
    }

    fn wake(&self) {
        let w = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(w) = w {
            w.wake();
        }
    }
}

struct Shared {
    stream: Mutex<StreamHandle>,
    reader: Slot,
    writer: Slot,
    drainer: Slot,
    /// Both halves are gone: the drainer ends, dropping the stream.
    closed: std::sync::atomic::AtomicBool,
    /// Cancelled by the session's driver when it stops.
    session_done: CancellationToken,
    /// Wakes all three.
    all: Waker,
}

struct WakeAll(Weak<Shared>);

impl Wake for WakeAll {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(s) = self.0.upgrade() {
            s.reader.wake();
            s.writer.wake();
            s.drainer.wake();
        }
    }
}

impl Shared {
    fn stream(&self) -> MutexGuard<'_, StreamHandle> {
        self.stream
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Poll the stream for `party` (its waker registered in `slot`) with the waker that wakes all three.
    fn poll<T>(
        &self,
        slot: &Slot,
        cx: &Context<'_>,
        f: impl FnOnce(Pin<&mut StreamHandle>, &mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        slot.register(cx.waker());
        let mut all = Context::from_waker(&self.all);
        f(Pin::new(&mut *self.stream()), &mut all)
    }
}

/// The halves' common hold on the stream; the last one dropped lets the drainer end.
struct Owner(Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.0.drainer.wake();
    }
}

pub struct MuxRead(Arc<Owner>);
pub struct MuxWrite(Arc<Owner>);

/// Split `stream` of the session whose driver cancels `session_done` when it stops, and start the stream's drainer
/// (on the current tokio runtime).
pub fn split(stream: StreamHandle, session_done: CancellationToken) -> (MuxRead, MuxWrite) {
    let shared = Arc::new_cyclic(|weak: &Weak<Shared>| Shared {
        stream: Mutex::new(stream),
        reader: Slot::default(),
        writer: Slot::default(),
        drainer: Slot::default(),
        closed: std::sync::atomic::AtomicBool::new(false),
        session_done: session_done.clone(),
        all: Waker::from(Arc::new(WakeAll(weak.clone()))),
    });
    let (drained, done) = (shared.clone(), session_done);
    tokio::spawn(async move {
        let drain = std::future::poll_fn(|cx| {
            if drained.closed.load(std::sync::atomic::Ordering::Acquire) {
                return Poll::Ready(());
            }
            let mut none = ReadBuf::new(&mut []);
            // Moves every queued frame into the stream's buffer (an empty buffer takes no bytes out of it).
            match drained.poll(&drained.drainer, cx, |mut stream, all| {
                stream.poll_peek(all, &mut none)
            }) {
                // Ended or failed: nothing more will arrive; the reader sees it for itself.
                Poll::Ready(Err(_)) => Poll::Ready(()),
                _ => Poll::Pending,
            }
        });
        tokio::select! {
            () = drain => {}
            // The session died: a stream waiting on it would wait for ever (its window never opens again, and
            // nothing wakes its reader), so both halves are woken to find it out.
            () = done.cancelled() => {
                drained.reader.wake();
                drained.writer.wake();
            }
        }
    });
    let owner = Arc::new(Owner(shared));
    (MuxRead(owner.clone()), MuxWrite(owner))
}

impl AsyncRead for MuxRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let s = &self.0 .0;
        let before = buf.filled().len();
        let read = s.poll(&s.reader, cx, |stream, all| stream.poll_read(all, buf));
        // What arrived before the session died is still read; an end or a wait after it is the tunnel gone.
        let nothing = match read {
            Poll::Ready(Ok(())) => buf.filled().len() == before && buf.remaining() > 0,
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
        };
        if nothing && s.session_done.is_cancelled() {
            return Poll::Ready(Err(gone()));
        }
        read
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "the tunnel is gone")
}

impl MuxWrite {
    /// Poll the stream for the writer, unless the session died: nothing written now could arrive.
    fn poll_writer<T>(
        &self,
        cx: &Context<'_>,
        f: impl FnOnce(Pin<&mut StreamHandle>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let s = &self.0 .0;
        if s.session_done.is_cancelled() {
            return Poll::Ready(Err(gone()));
        }
        let polled = s.poll(&s.writer, cx, f);
        // The session may have died between the check and the waker's registration, its wake-up missed.
        if polled.is_pending() && s.session_done.is_cancelled() {
            return Poll::Ready(Err(gone()));
        }
        polled
    }
}

impl AsyncWrite for MuxWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_writer(cx, |stream, all| stream.poll_write(all, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_writer(cx, |stream, all| stream.poll_flush(all))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_writer(cx, |stream, all| stream.poll_shutdown(all))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A stream whose peer stops reading waits for window, and its reader for data; when the session's driver
    /// stops, both fail at once instead of waiting for ever.
    #[tokio::test]
    async fn both_halves_fail_when_the_session_dies() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut ours = tokio_yamux::Session::new_client(a, crate::yamux_config());
        let mut theirs = tokio_yamux::Session::new_server(b, crate::yamux_config());
        let mut control = ours.control();
        let done = CancellationToken::new();
        let stop = done.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                _ = async { while ours.next().await.is_some() {} } => {}
            }
        });
        // The peer takes the stream and never reads it.
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(Ok(s)) = theirs.next().await {
                held.push(s);
            }
        });
        let (mut r, mut w) = split(control.open_stream().await.unwrap(), done.clone());
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0;
        while tokio::time::timeout(std::time::Duration::from_millis(300), w.write_all(&chunk))
            .await
            .is_ok()
        {
            sent += chunk.len();
            assert!(
                sent <= 2 * crate::STREAM_WINDOW as usize,
                "no window ever ran out"
            );
        }
        // Both wait now, for window and for data.
        let writing = tokio::spawn(async move { w.write_all(&chunk).await });
        let reading = tokio::spawn(async move { r.read(&mut [0u8; 16]).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!writing.is_finished() && !reading.is_finished());
        done.cancel();
        async fn aborted<T: std::fmt::Debug>(
            half: tokio::task::JoinHandle<io::Result<T>>,
            what: &str,
        ) {
            let ended = tokio::time::timeout(std::time::Duration::from_secs(5), half).await;
            let err = ended.unwrap_or_else(|_| panic!("the {what} is left waiting"));
            assert_eq!(
                err.unwrap().unwrap_err().kind(),
                io::ErrorKind::ConnectionAborted,
                "{what}"
            );
        }
        aborted(writing, "writer").await;
        aborted(reading, "reader").await;
    }
}
