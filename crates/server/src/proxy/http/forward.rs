//! The two directions of a forwarded absolute-form request (`GET http://…`), as readers the relay copies from.
//!
//! [`OneRequest`] passes the client's request body and nothing after it: a client that sends its next request on
//! the same connection, possibly to another site with its credentials in it, must never have that request sent
//! raw to the first site. What follows the body is kept (up to [`DRAIN`] bytes) for the door to read as the next
//! request. [`Answer`] rewrites the origin's response head for the client and ends where the response's body ends
//! (its `Content-Length`, its last chunk), so that the client's connection can carry its next request; an answer
//! that only its close can end is passed on with `Connection: close`.
//!
//! A chunked request body can turn out malformed after its first bytes have gone to the origin. The two halves
//! share an [`Exchange`]: the request stops being read there, and the client gets a `400` in place of the origin's
//! answer if none of that answer has reached it yet (a reset if some has, so that it cannot take the partial answer
//! for a whole one).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use futures_util::task::AtomicWaker;

use proxyfleet_proto::chunked::{ChunkedEnd, ChunkedError};
use proxyfleet_proto::http_proxy::{self as hp, BodyLength};
use tokio::io::{AsyncRead, ReadBuf};

/// After its request, how much more a client may send before its next request is answered, bytes: enough for a
/// few pipelined requests. Reading on sees the client's close (passed on to the origin as a half-close); past this
/// the client is no longer read until its answer is out, so it cannot make the server hold unlimited bytes.
const DRAIN: usize = 64 * 1024;

/// Follows a message's body to its end.
enum Framing {
    Length(u64),
    Chunked(ChunkedEnd),
    UntilClose,
    Done,
    /// Ended, but in a form only a lenient reader takes ([`ChunkedEnd::was_lenient`]): a stricter client or
    /// origin may see the end elsewhere, so nothing after it is read as the next message.
    DoneLeniently,
}

impl Framing {
    fn new(length: BodyLength) -> Self {
        match length {
            BodyLength::None | BodyLength::Length(0) => Framing::Done,
            BodyLength::Length(n) => Framing::Length(n),
            BodyLength::Chunked => Framing::Chunked(ChunkedEnd::default()),
            BodyLength::UntilClose => Framing::UntilClose,
        }
    }

    /// How many of `bytes` (the next ones of the message) belong to the body.
    fn take(&mut self, bytes: &[u8]) -> Result<usize, ChunkedError> {
        let n = match self {
            Framing::Done | Framing::DoneLeniently => 0,
            Framing::UntilClose => bytes.len(),
            Framing::Length(left) => {
                let n = bytes
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                if *left == 0 {
                    *self = Framing::Done;
                }
                n
            }
            Framing::Chunked(c) => {
                let n = c.feed(bytes)?;
                if c.is_done() {
                    *self = if c.was_lenient() {
                        Framing::DoneLeniently
                    } else {
                        Framing::Done
                    };
                }
                n
            }
        };
        Ok(n)
    }

    fn done(&self) -> bool {
        matches!(self, Framing::Done | Framing::DoneLeniently)
    }

    /// Ended where every reader agrees it ends: another message may follow on the same connection.
    fn ended_strictly(&self) -> bool {
        matches!(self, Framing::Done)
    }
}

/// What the two halves of one forwarded request tell each other, and the door after the relay.
#[derive(Default)]
pub struct Exchange {
    /// Set by [`OneRequest`] when the client's chunked body is malformed; read by [`Answer`] (whose read it wakes)
    /// with an atomic load and a waker registration, on every read of the answer.
    fault: OnceLock<ChunkedError>,
    answer: AtomicWaker,
    /// The origin's final answer ended where its framing says, and it leaves the client's connection open.
    reusable: AtomicBool,
    /// The client's request has ended whole (where every reader agrees). Until then an answer cannot keep the
    /// connection (the origin answered early, say to a refused `Expect: 100-continue`), and says so.
    request_done: AtomicBool,
}

impl Exchange {
    fn set_request_done(&self) {
        self.request_done.store(true, Ordering::Release);
    }

    fn set_fault(&self, e: ChunkedError) {
        let _ = self.fault.set(e);
        self.answer.wake();
    }

    /// The body's fault, if it has one; otherwise `cx` is woken when it is found.
    fn check(&self, cx: &Context<'_>) -> Option<ChunkedError> {
        // Registered before looking, so that a fault set in between still wakes it.
        self.answer.register(cx.waker());
        self.fault.get().cloned()
    }

    /// Whether the client may send its next request on the same connection, as far as the answer goes.
    pub fn reusable(&self) -> bool {
        self.reusable.load(Ordering::Acquire)
    }
}

/// The client's side of a forwarded request: the bytes already read past the head, then the socket, cut at the
/// end of the request's body.
pub struct OneRequest<R> {
    held: Vec<u8>,
    at: usize,
    inner: R,
    body: Framing,
    /// The body was malformed ([`Exchange`]): nothing more is read or passed on.
    bad: bool,
    /// What the client sent after the request, up to about [`DRAIN`] bytes.
    next: Vec<u8>,
    /// The client closed (or half-closed) its side.
    closed: bool,
    exchange: Arc<Exchange>,
}

impl<R> OneRequest<R> {
    pub fn new(held: Vec<u8>, inner: R, length: BodyLength, exchange: Arc<Exchange>) -> Self {
        let body = Framing::new(length);
        // Without a body, what was read past the head already belongs to the next request.
        let (held, next) = if body.done() {
            exchange.set_request_done();
            (Vec::new(), held)
        } else {
            (held, Vec::new())
        };
        OneRequest {
            held,
            at: 0,
            inner,
            body,
            bad: false,
            next,
            closed: false,
            exchange,
        }
    }

    /// The client's socket, and — when the request ended whole and the client is still there — what it sent
    /// after it (the start of its next request, if any).
    pub fn finish(self) -> (R, Option<Vec<u8>>) {
        let whole = self.body.ended_strictly() && !self.bad && !self.closed;
        (self.inner, whole.then_some(self.next))
    }

    /// [`Framing::take`] of the next bytes of the body, a malformed body reported to the answer's side.
    fn take(&mut self, bytes: &[u8]) -> usize {
        let n = self.body.take(bytes).unwrap_or_else(|e| {
            tracing::debug!(error = %e, "the client's chunked request body is malformed");
            self.bad = true;
            self.exchange.set_fault(e);
            0
        });
        if self.body.ended_strictly() {
            self.exchange.set_request_done();
        }
        n
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
            let held = std::mem::take(&mut this.held);
            let rest = &held[this.at..];
            let n = this.take(&rest[..rest.len().min(out.remaining())]);
            out.put_slice(&rest[..n]);
            this.at += n;
            if this.body.done() {
                this.next.extend_from_slice(&held[this.at..]);
            } else if !this.bad {
                this.held = held;
            }
            if n > 0 {
                return Poll::Ready(Ok(()));
            }
        }
        loop {
            // No longer read: the flow ends with the origin's answer (or a stop), never by this side. Pending
            // without a waker on purpose: the relay's pump wakes for the stop, which comes when the answer is done.
            if this.bad || (this.body.done() && this.next.len() >= DRAIN) {
                return Poll::Pending;
            }
            let before = out.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
            if out.filled().len() == before {
                // The client closed (or half-closed) its side: the relay passes that on.
                this.closed = true;
                return Poll::Ready(Ok(()));
            }
            let n = if this.body.done() {
                0
            } else {
                this.take(&out.filled()[before..])
            };
            if this.body.done() {
                this.next.extend_from_slice(&out.filled()[before + n..]);
            }
            out.set_filled(before + n);
            if n > 0 {
                return Poll::Ready(Ok(()));
            }
        }
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
    /// The body: what was read with the head first, then the origin's stream, up to the body's end.
    Body { framing: Framing, held: Vec<u8> },
    /// The answer is complete (or a synthesized one was handed out): end of stream.
    End,
}

/// The origin's side of a forwarded request: its response head rewritten for the client (interim 1xx answers
/// first, as they come), then the body unchanged, up to its end. An origin that closes without an answer, or
/// answers with something that is not an HTTP response, gets the client a `502` instead; one that closes inside a
/// body whose length it announced, or sends a malformed chunked body, fails the read (the client is reset).
pub struct Answer<R> {
    inner: R,
    phase: Phase,
    /// Whose final answer (not an interim one) goes to the client, once one has begun.
    final_answer: Option<Whose>,
    /// The request was `HEAD` (its answer has no body) / the client asked to keep its connection.
    head_request: bool,
    client_persistent: bool,
    /// The origin's final answer lets the client's connection stay, once the answer is whole.
    persistent: bool,
    exchange: Arc<Exchange>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Whose {
    Origin,
    Ours,
}

impl<R> Answer<R> {
    pub fn new(inner: R, exchange: Arc<Exchange>, req: &hp::ProxyRequest) -> Self {
        Answer {
            inner,
            phase: Phase::Head(Vec::new()),
            final_answer: None,
            head_request: req.method == "HEAD",
            client_persistent: req.persistent,
            persistent: false,
            exchange,
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

    /// The body has ended (`strictly`: where every reader agrees): the client may go on, if the answer said so.
    fn complete(&mut self, strictly: bool) {
        self.exchange
            .reusable
            .store(self.persistent && strictly, Ordering::Release);
        self.phase = Phase::End;
    }
}

fn bad_gateway(why: &str) -> Vec<u8> {
    super::plain_answer(502, "", why)
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The refusal goes to the tunnel stream the answer is read from.
impl<R: proxyfleet_proto::end::TunnelRead> proxyfleet_proto::end::TunnelRead for Answer<R> {
    fn refuse(&mut self, code: u32) -> bool {
        self.inner.refuse(code)
    }
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
                if let Some(e) = this.exchange.check(cx) {
                    if this.final_answer.is_some() {
                        return Poll::Ready(Err(invalid(e)));
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
                Phase::Body { framing, held } => {
                    if framing.done() {
                        let strictly = framing.ended_strictly();
                        this.complete(strictly);
                        continue;
                    }
                    if !held.is_empty() {
                        let n = framing
                            .take(&held[..held.len().min(out.remaining())])
                            .map_err(invalid)?;
                        out.put_slice(&held[..n]);
                        if framing.done() {
                            held.clear();
                        } else {
                            held.drain(..n);
                        }
                        return Poll::Ready(Ok(()));
                    }
                    let before = out.filled().len();
                    ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
                    if out.filled().len() == before {
                        if matches!(framing, Framing::UntilClose) {
                            this.complete(false);
                            return Poll::Ready(Ok(()));
                        }
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the site's answer ended before its body did",
                        )));
                    }
                    let taken = framing.take(&out.filled()[before..]);
                    // What was read goes out only up to the body's end (none of it if it is malformed).
                    out.set_filled(before + *taken.as_ref().unwrap_or(&0));
                    return Poll::Ready(taken.map(drop).map_err(invalid));
                }
                Phase::Head(buf) => {
                    let stays = this.client_persistent
                        && this.exchange.request_done.load(Ordering::Acquire);
                    match hp::client_response_head(buf, this.head_request, stays) {
                        Ok(Some(head)) => {
                            let rest = buf.split_off(head.used);
                            let after = if head.interim() {
                                Phase::Head(rest)
                            } else {
                                this.final_answer = Some(Whose::Origin);
                                this.persistent = head.persistent;
                                Phase::Body {
                                    framing: Framing::new(head.body),
                                    held: rest,
                                }
                            };
                            this.phase = Phase::Out {
                                bytes: head.head,
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

    /// A `GET` whose client keeps its connection (`persistent`) or says `close`.
    fn get(persistent: bool) -> hp::ProxyRequest {
        let head = if persistent {
            &b"GET http://a.example/ HTTP/1.1\r\n\r\n"[..]
        } else {
            b"GET http://a.example/ HTTP/1.1\r\nConnection: close\r\n\r\n"
        };
        hp::parse_head(head).unwrap().unwrap().0
    }

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
            let mut r = OneRequest::new(held.to_vec(), a, length, Default::default());
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, body, "{length:?}");
            // What followed is kept for the next request, but not from a client that closed.
            assert_eq!(r.next, next, "{length:?}");
            assert_eq!(r.finish().1, None);
        }
    }

    /// A client that keeps sending after its request is read (its bytes kept for its next request) only up to the
    /// drain limit, then not at all until its answer is out: it cannot make the server take unlimited bytes.
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
        let bad = Arc::new(Exchange::default());
        let mut r = OneRequest::new(Vec::new(), a, BodyLength::Chunked, bad.clone());
        // The origin's far end stays open, silent.
        let (origin, _origin_far) = tokio::io::duplex(64);
        let answer = tokio::spawn(read_all(Answer::new(origin, bad, &get(true))));
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
        let bad = Arc::new(Exchange::default());
        let mut r = OneRequest::new(Vec::new(), a, BodyLength::Chunked, bad.clone());
        let (origin, _origin_far) = origin_answering().await;
        let mut answer = Answer::new(origin, bad, &get(true));
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

    /// What the client gets for `from_origin` (whose far end then closes), to a request that says `close`.
    async fn answer(from_origin: &[u8]) -> String {
        let (got, _) = answer_to(from_origin, false).await;
        String::from_utf8(got.unwrap()).unwrap()
    }

    /// What the client gets for `from_origin` (whose far end then closes) and whether its connection may stay.
    async fn answer_to(from_origin: &[u8], persistent: bool) -> (io::Result<Vec<u8>>, bool) {
        let (a, mut b) = tokio::io::duplex(5);
        let sent = from_origin.to_vec();
        tokio::spawn(async move {
            // The answer may end before all of it was read.
            let _ = b.write_all(&sent).await;
        });
        let exchange = Arc::new(Exchange::default());
        exchange.set_request_done();
        let mut got = Vec::new();
        let r = Answer::new(a, exchange.clone(), &get(persistent))
            .read_to_end(&mut got)
            .await;
        (r.map(|_| got), exchange.reusable())
    }

    /// An answer ends where its body does, whatever the origin sends after it, and the client's connection may
    /// then carry its next request; one the origin cuts short fails, and one only a close can end says so.
    #[tokio::test]
    async fn the_answer_ends_with_its_body() {
        let (got, stays) = answer_to(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\n\r\nsmuggled",
            true,
        )
        .await;
        assert_eq!(
            got.unwrap(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
        );
        assert!(stays);
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n";
        let mut more = chunked.to_vec();
        more.extend_from_slice(b"extra");
        let (got, stays) = answer_to(&more, true).await;
        assert_eq!(got.unwrap(), chunked);
        assert!(stays);
        // HEAD and 304: the head alone.
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            .await
            .unwrap();
        let head = hp::parse_head(b"HEAD http://a.example/ HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap()
            .0;
        let exchange = Arc::new(Exchange::default());
        exchange.set_request_done();
        let got = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            read_all(Answer::new(a, exchange.clone(), &head)),
        )
        .await
        .expect("ends without the origin's close");
        assert_eq!(got, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
        assert!(exchange.reusable());
        let (got, stays) = answer_to(b"HTTP/1.1 304 Not Modified\r\n\r\n", true).await;
        assert_eq!(got.unwrap(), b"HTTP/1.1 304 Not Modified\r\n\r\n");
        assert!(stays);

        // Cut short, or a malformed chunk: the read fails, and the connection does not stay.
        for cut in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let (got, stays) = answer_to(cut, true).await;
            assert!(got.is_err() && !stays, "{}", String::from_utf8_lossy(cut));
        }
        // Only the origin's close ends it: passed on whole, with `Connection: close`.
        let (got, stays) = answer_to(b"HTTP/1.1 200 OK\r\n\r\nall of it", true).await;
        assert_eq!(
            got.unwrap(),
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"
        );
        assert!(!stays);
        // A chunked answer only a lenient reader takes (bare LF): passed on, but the connection does not stay, so
        // that a stricter client cannot read what follows it as the answer to its next request.
        let (got, stays) = answer_to(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
            true,
        )
        .await;
        assert!(got.unwrap().ends_with(b"5\nhello\r\n0\r\n\r\n"));
        assert!(!stays);
        // The origin answers before the request has ended: the answer says the connection ends with it.
        let (a, mut b) = tokio::io::duplex(256);
        b.write_all(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 2\r\n\r\nno")
            .await
            .unwrap();
        let exchange = Arc::new(Exchange::default());
        let (_client, far) = tokio::io::duplex(64);
        let _upload = OneRequest::new(Vec::new(), far, BodyLength::Length(9), exchange.clone());
        let got = read_all(Answer::new(a, exchange.clone(), &get(true))).await;
        let got = String::from_utf8(got).unwrap();
        assert!(
            got.contains("Connection: close\r\n") && got.ends_with("no"),
            "{got}"
        );
        assert!(!exchange.reusable());
        // The client said `close`: a whole answer does not keep it either.
        let (_, stays) = answer_to(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false).await;
        assert!(!stays);
    }

    /// The next request, sent behind the first (pipelined, in the same read or later), is kept whole for the door.
    #[tokio::test]
    async fn what_follows_the_request_is_kept_for_the_next_one() {
        let next = b"GET http://b.example/ HTTP/1.1\r\n\r\n";
        let mut wire = b"5\r\nhello\r\n0\r\n\r\n".to_vec();
        wire.extend_from_slice(next);
        let (a, mut b) = tokio::io::duplex(1024);
        let (held, sent) = wire.split_at(12);
        b.write_all(sent).await.unwrap();
        let mut r = OneRequest::new(held.to_vec(), a, BodyLength::Chunked, Default::default());
        let mut body = Vec::new();
        let mut buf = [0u8; 64];
        while body.len() < 15 {
            let n = r.read(&mut buf).await.unwrap();
            body.extend_from_slice(&buf[..n]);
        }
        assert_eq!(body, b"5\r\nhello\r\n0\r\n\r\n");
        // Nothing more comes out; the rest waits.
        let more = tokio::time::timeout(std::time::Duration::from_millis(100), r.read(&mut buf));
        assert!(more.await.is_err());
        let (_, kept) = r.finish();
        assert_eq!(kept.as_deref(), Some(&next[..]));

        // A body only a lenient reader takes: what follows it is not taken as the next request.
        let (a, mut b) = tokio::io::duplex(1024);
        b.write_all(b"5\nhello\r\n0\r\n\r\nGET http://b.example/ HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut r = OneRequest::new(Vec::new(), a, BodyLength::Chunked, Default::default());
        let mut body = Vec::new();
        while body.len() < 14 {
            let n = r.read(&mut buf).await.unwrap();
            body.extend_from_slice(&buf[..n]);
        }
        assert_eq!(r.finish().1, None);
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
        let got = String::from_utf8(
            read_all(Answer::new(Failing, Default::default(), &get(false))).await,
        )
        .unwrap();
        assert!(
            got.starts_with("HTTP/1.1 502 Bad Gateway\r\n")
                && got.contains("failed before its answer"),
            "{got}"
        );
    }
}
