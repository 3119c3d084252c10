//! The two directions of a forwarded absolute-form request (`GET http://…`), as readers the relay copies from.
//!
//! [`OneRequest`] passes the client's request body and nothing after it: a client that reuses its connection to
//! the proxy for another request, possibly to another site with its credentials in it, must never have that
//! request sent raw to the first site. [`Answer`] rewrites the origin's response head for the client, ending it
//! with `Connection: close`, so the client sends its next request on a new connection instead.
//!
//! A chunked request body can turn out malformed after its first bytes have gone to the origin. The two halves
//! share a [`BadBody`]: the request stops being read there, and the client gets a `400` in place of the origin's
//! answer if none of that answer has reached it yet (a reset if some has, so that it cannot take the partial answer
//! for a whole one).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use futures_util::task::AtomicWaker;

use proxyfleet_proto::chunked::{ChunkedEnd, ChunkedError};
use proxyfleet_proto::http_proxy::{self as hp, BodyLength};
use tokio::io::{AsyncRead, ReadBuf};

/// After its request, how much more a client may send to be read and dropped, bytes: enough for a pipelined
/// request or two. Reading on sees the client's close (passed on to the origin as a half-close) and keeps unread
/// bytes from turning our close into a reset; past this the client is no longer read at all, so it cannot make the
/// server take unlimited (and uncharged) bytes.
const DRAIN: usize = 64 * 1024;

enum Body {
    Length(u64),
    Chunked(ChunkedEnd),
    /// The request is complete: what the client sends now is read and dropped, up to [`DRAIN`] bytes in all.
    Done {
        dropped: usize,
    },
    /// The body was malformed ([`BadBody`]): nothing more is read or passed on.
    Bad,
}

/// The client's side of a forwarded request: the bytes already read past the head, then the socket, cut at the
/// end of the request's body.
pub struct OneRequest<R> {
    held: Vec<u8>,
    at: usize,
    inner: R,
    body: Body,
    bad: Arc<BadBody>,
}

/// Set by [`OneRequest`] when the client's body is malformed, read by [`Answer`] (whose read it wakes). Reading it
/// is an atomic load and a waker registration, on every read of the answer.
#[derive(Default)]
pub struct BadBody {
    fault: OnceLock<ChunkedError>,
    answer: AtomicWaker,
}

impl BadBody {
    fn set(&self, e: ChunkedError) {
        let _ = self.fault.set(e);
        self.answer.wake();
    }

    /// The body's fault, if it has one; otherwise `cx` is woken when it is found.
    fn check(&self, cx: &Context<'_>) -> Option<ChunkedError> {
        // Registered before looking, so that a fault set in between still wakes it.
        self.answer.register(cx.waker());
        self.fault.get().cloned()
    }
}

impl<R> OneRequest<R> {
    /// The client's socket, after the request.
    pub fn into_inner(self) -> R {
        self.inner
    }

    pub fn new(held: Vec<u8>, inner: R, length: BodyLength, bad: Arc<BadBody>) -> Self {
        let body = match length {
            BodyLength::None => Body::Done { dropped: 0 },
            BodyLength::Length(n) => Body::Length(n),
            BodyLength::Chunked => Body::Chunked(ChunkedEnd::default()),
        };
        OneRequest {
            held,
            at: 0,
            inner,
            body,
            bad,
        }
    }
}

impl Body {
    /// How many of `bytes` (the next ones from the client) belong to the request.
    fn take(&mut self, bytes: &[u8]) -> Result<usize, ChunkedError> {
        let n = match self {
            Body::Bad => 0,
            Body::Done { dropped } => {
                *dropped += bytes.len();
                0
            }
            Body::Length(left) => {
                let n = bytes
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                if *left == 0 {
                    *self = Body::Done { dropped: 0 };
                }
                n
            }
            Body::Chunked(c) => {
                let n = c.feed(bytes)?;
                if c.is_done() {
                    *self = Body::Done { dropped: 0 };
                }
                n
            }
        };
        Ok(n)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for OneRequest<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.held.len() {
            let held = &this.held[this.at..];
            let n = this
                .body
                .take_or_report(&this.bad, &held[..held.len().min(out.remaining())]);
            out.put_slice(&held[..n]);
            this.at = if matches!(this.body, Body::Done { .. } | Body::Bad) {
                this.held.len()
            } else {
                this.at + n
            };
            if n > 0 {
                return Poll::Ready(Ok(()));
            }
        }
        loop {
            match this.body {
                // No longer read: the flow ends with the origin's answer (or a stop), never by this side.
                Body::Done { dropped } if dropped >= DRAIN => return Poll::Pending,
                Body::Bad => return Poll::Pending,
                _ => {}
            }
            let before = out.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
            let got = out.filled().len() - before;
            if got == 0 {
                // The client closed (or half-closed) its side: the relay passes that on.
                return Poll::Ready(Ok(()));
            }
            let n = this.body.take_or_report(&this.bad, &out.filled()[before..]);
            out.set_filled(before + n);
            if n > 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl Body {
    /// [`Body::take`], a malformed body reported to the answer's side.
    fn take_or_report(&mut self, bad: &BadBody, bytes: &[u8]) -> usize {
        self.take(bytes).unwrap_or_else(|e| {
            tracing::debug!(error = %e, "the client's chunked request body is malformed");
            *self = Body::Bad;
            bad.set(e);
            0
        })
    }
}

enum Phase {
    /// Collecting a response head.
    Head(Vec<u8>),
    /// Handing out `bytes[at..]`, then going on as `next`.
    Out {
        bytes: Vec<u8>,
        at: usize,
        next: Box<Phase>,
    },
    /// The body: passed through.
    Body,
    /// A synthesized error answer was handed out: end of stream.
    End,
}

/// The origin's side of a forwarded request: its response head rewritten for the client (interim 1xx answers
/// first, as they come), then the body unchanged. An origin that closes without an answer, or answers with
/// something that is not an HTTP response, gets the client a `502` instead.
pub struct Answer<R> {
    inner: R,
    phase: Phase,
    /// Whose final answer (not an interim one) goes to the client, once one has begun.
    final_answer: Option<Whose>,
    bad: Arc<BadBody>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Whose {
    Origin,
    Ours,
}

impl<R> Answer<R> {
    pub fn new(inner: R, bad: Arc<BadBody>) -> Self {
        Answer {
            inner,
            phase: Phase::Head(Vec::new()),
            final_answer: None,
            bad,
        }
    }

    /// Hand out a synthesized answer, then end.
    fn synthesize(&mut self, answer: Vec<u8>) {
        self.final_answer = Some(Whose::Ours);
        self.phase = Phase::Out {
            bytes: answer,
            at: 0,
            next: Box::new(Phase::End),
        };
    }
}

fn bad_gateway(why: &str) -> Vec<u8> {
    super::plain_answer(502, "", why)
}

impl<R: AsyncRead + Unpin> AsyncRead for Answer<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            // The client's body is malformed: it is told so, unless the origin's answer is already on its way, which
            // is then cut short. (Checked between messages only, so that an interim answer goes out whole first.)
            let watch = match this.final_answer {
                Some(whose) => whose == Whose::Origin,
                None => matches!(this.phase, Phase::Head(_)),
            };
            if watch {
                if let Some(e) = this.bad.check(cx) {
                    if this.final_answer.is_some() {
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                    }
                    this.synthesize(super::plain_answer(
                        400,
                        "",
                        &format!("the request's chunked body is malformed: {e}"),
                    ));
                    continue;
                }
            }
            match &mut this.phase {
                Phase::Body => return Pin::new(&mut this.inner).poll_read(cx, out),
                Phase::End => return Poll::Ready(Ok(())),
                Phase::Out { bytes, at, next } => {
                    let n = out.remaining().min(bytes.len() - *at);
                    out.put_slice(&bytes[*at..*at + n]);
                    *at += n;
                    if *at == bytes.len() {
                        this.phase = std::mem::replace(next.as_mut(), Phase::End);
                    }
                    return Poll::Ready(Ok(()));
                }
                Phase::Head(buf) => {
                    match hp::client_response_head(buf) {
                        Ok(Some((head, code, used))) => {
                            let rest = buf.split_off(used);
                            let interim = code < 200 && code != 101;
                            if !interim {
                                this.final_answer = Some(Whose::Origin);
                            }
                            // An interim answer (100 Continue): the real one follows. (101 would switch
                            // protocols, but `Upgrade` never reaches the origin.)
                            let after = if interim {
                                Phase::Head(rest)
                            } else if rest.is_empty() {
                                Phase::Body
                            } else {
                                Phase::Out {
                                    bytes: rest,
                                    at: 0,
                                    next: Box::new(Phase::Body),
                                }
                            };
                            this.phase = Phase::Out {
                                bytes: head,
                                at: 0,
                                next: Box::new(after),
                            };
                            continue;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "the origin's answer head was refused");
                            let why = match e {
                                hp::HeadError::TooLarge | hp::HeadError::TooManyHeaders => {
                                    "the site's answer head is too large"
                                }
                                hp::HeadError::Framing => {
                                    "the site's answer has an invalid Content-Length"
                                }
                                _ => "the site did not answer with HTTP",
                            };
                            this.synthesize(bad_gateway(why));
                            continue;
                        }
                    }
                    let mut chunk = [0u8; 4096];
                    let mut rb = ReadBuf::new(&mut chunk);
                    if let Err(e) = ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb)) {
                        // Nothing went to the client yet: it can still be told, instead of being reset.
                        tracing::debug!(error = %e, "the way to the origin failed before its answer");
                        this.synthesize(bad_gateway(
                            "the connection to the site failed before its answer",
                        ));
                        continue;
                    }
                    if rb.filled().is_empty() {
                        let why = if buf.is_empty() {
                            "the site closed the connection without an answer"
                        } else {
                            "the site's answer ended inside its head"
                        };
                        this.synthesize(bad_gateway(why));
                        continue;
                    }
                    buf.extend_from_slice(rb.filled());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn read_all<R: AsyncRead + Unpin>(mut r: R) -> Vec<u8> {
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        out
    }

    /// Whatever the client sends after its request (another request, to any site) never comes out.
    #[tokio::test]
    async fn only_the_request_itself_is_passed_on() {
        let next =
            b"GET http://other.example/ HTTP/1.1\r\nProxy-Authorization: Basic c2VjcmV0\r\n\r\n";
        for (length, body) in [
            (BodyLength::None, &b""[..]),
            (BodyLength::Length(11), b"hello world"),
            (
                BodyLength::Chunked,
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            ),
        ] {
            let mut wire = body.to_vec();
            wire.extend_from_slice(next);
            // Part of it was read with the head, the rest arrives over the socket in small pieces.
            let (held, sent) = wire.split_at(wire.len().min(3));
            let (a, mut b) = tokio::io::duplex(7);
            let sent = sent.to_vec();
            tokio::spawn(async move {
                for piece in sent.chunks(5) {
                    b.write_all(piece).await.unwrap();
                }
            });
            let got = read_all(OneRequest::new(
                held.to_vec(),
                a,
                length,
                Default::default(),
            ))
            .await;
            assert_eq!(got, body, "{length:?}");
        }
    }

    /// A client that keeps sending after its request is read (and its bytes dropped) only up to the drain limit,
    /// then not at all: it cannot make the server take unlimited bytes.
    #[tokio::test]
    async fn what_follows_the_request_is_drained_only_so_far() {
        struct Counted<R>(R, std::sync::Arc<std::sync::atomic::AtomicUsize>);
        impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                out: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                let before = out.filled().len();
                let r = Pin::new(&mut self.0).poll_read(cx, out);
                let n = out.filled().len() - before;
                self.1.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                r
            }
        }
        let (a, mut b) = tokio::io::duplex(DRAIN * 4);
        b.write_all(&vec![b'x'; DRAIN * 3]).await.unwrap();
        let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut r = OneRequest::new(
            Vec::new(),
            Counted(a, taken.clone()),
            BodyLength::None,
            Default::default(),
        );
        let mut buf = [0u8; 1024];
        let more = tokio::time::timeout(std::time::Duration::from_millis(100), r.read(&mut buf));
        assert!(
            more.await.is_err(),
            "nothing is passed on, and the read waits"
        );
        let taken = taken.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            (DRAIN..DRAIN + buf.len()).contains(&taken),
            "{taken} bytes read from the client"
        );
    }

    /// A malformed chunked body stops being read where it goes wrong, and the client is answered `400` instead of
    /// by the origin, which never answers such a request; once the origin's answer has begun, it is cut short.
    #[tokio::test]
    async fn a_malformed_chunked_body_is_answered_400_or_cuts_the_answer_short() {
        let (a, mut b) = tokio::io::duplex(64);
        let bad = Arc::new(BadBody::default());
        let mut r = OneRequest::new(Vec::new(), a, BodyLength::Chunked, bad.clone());
        // The origin's far end stays open, silent.
        let (origin, _origin_far) = tokio::io::duplex(64);
        let answer = tokio::spawn(read_all(Answer::new(origin, bad)));
        b.write_all(b"5\r\nhello\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = r.read(&mut buf).await.unwrap();
        let mut passed = buf[..n].to_vec();
        b.write_all(b"zz\r\n").await.unwrap();
        let more = tokio::time::timeout(std::time::Duration::from_millis(200), async {
            loop {
                let n = r.read(&mut buf).await.unwrap();
                passed.extend_from_slice(&buf[..n]);
            }
        });
        assert!(
            more.await.is_err(),
            "after the fault the request is not read on"
        );
        assert_eq!(passed, b"5\r\nhello\r\n");
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), answer)
            .await
            .expect("the client is answered without the origin");
        let got = String::from_utf8(got.unwrap()).unwrap();
        assert!(
            got.starts_with("HTTP/1.1 400 Bad Request\r\n") && got.contains("malformed chunk size"),
            "{got}"
        );

        let (a, mut b) = tokio::io::duplex(64);
        let bad = Arc::new(BadBody::default());
        let mut r = OneRequest::new(Vec::new(), a, BodyLength::Chunked, bad.clone());
        let (origin, _origin_far) = origin_answering().await;
        let mut answer = Answer::new(origin, bad);
        let mut head = [0u8; 19];
        answer.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200 OK\r\nCo");
        b.write_all(b"zz\r\n").await.unwrap();
        let _ = tokio::time::timeout(std::time::Duration::from_millis(100), r.read(&mut buf)).await;
        let mut rest = Vec::new();
        let err = answer.read_to_end(&mut rest).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    /// The way to an origin that has begun a long answer, and its far end (kept open: the rest is to come).
    async fn origin_answering() -> (tokio::io::DuplexStream, tokio::io::DuplexStream) {
        let (a, mut b) = tokio::io::duplex(1024);
        b.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome")
            .await
            .unwrap();
        (a, b)
    }

    async fn answer(from_origin: &[u8]) -> String {
        let (a, mut b) = tokio::io::duplex(5);
        let sent = from_origin.to_vec();
        tokio::spawn(async move {
            b.write_all(&sent).await.unwrap();
        });
        String::from_utf8(read_all(Answer::new(a, Default::default())).await).unwrap()
    }

    #[tokio::test]
    async fn the_answer_says_connection_close_and_keeps_its_body() {
        assert_eq!(
            answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello").await,
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        );
        assert!(answer(b"")
            .await
            .starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(answer(b"HTTP/1.1 200 OK\r\nContent-")
            .await
            .contains("ended inside its head"));
        assert!(
            answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")
                .await
                .starts_with("HTTP/1.1 502 Bad Gateway\r\n")
        );
        assert!(answer(b"\x16\x03\x01 not http\r\n\r\n")
            .await
            .contains("did not answer with HTTP"));
        // The way to the origin fails (the site reset the connection, the device went) before any answer: the
        // client is told, with a 502, instead of being reset.
        struct Failing;
        impl AsyncRead for Failing {
            fn poll_read(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
            }
        }
        let got =
            String::from_utf8(read_all(Answer::new(Failing, Default::default())).await).unwrap();
        assert!(
            got.starts_with("HTTP/1.1 502 Bad Gateway\r\n")
                && got.contains("failed before its answer"),
            "{got}"
        );
    }
}
