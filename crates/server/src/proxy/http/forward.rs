//! The two directions of a forwarded absolute-form request (`GET http://…`), as readers the relay copies from.
//!
//! [`OneRequest`] passes the client's request body and nothing after it: a client that reuses its connection to
//! the proxy for another request, possibly to another site with its credentials in it, must never have that
//! request sent raw to the first site. [`Answer`] rewrites the origin's response head for the client, ending it
//! with `Connection: close`, so the client sends its next request on a new connection instead.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use proxyfleet_proto::chunked::ChunkedEnd;
use proxyfleet_proto::http_proxy::{self as hp, BodyLength};
use tokio::io::{AsyncRead, ReadBuf};

enum Body {
    Length(u64),
    Chunked(ChunkedEnd),
    /// The request is complete: what the client sends now is read and dropped (so that a client's close is
    /// seen, and its unread bytes do not turn our close into a reset).
    Done,
}

/// The client's side of a forwarded request: the bytes already read past the head, then the socket, cut at the
/// end of the request's body.
pub struct OneRequest<R> {
    held: Vec<u8>,
    at: usize,
    inner: R,
    body: Body,
}

impl<R> OneRequest<R> {
    pub fn new(held: Vec<u8>, inner: R, length: BodyLength) -> Self {
        let body = match length {
            BodyLength::None => Body::Done,
            BodyLength::Length(n) => Body::Length(n),
            BodyLength::Chunked => Body::Chunked(ChunkedEnd::default()),
        };
        OneRequest {
            held,
            at: 0,
            inner,
            body,
        }
    }
}

impl Body {
    /// How many of `bytes` (the next ones from the client) belong to the request.
    fn take(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let n = match self {
            Body::Done => 0,
            Body::Length(left) => {
                let n = bytes
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                if *left == 0 {
                    *self = Body::Done;
                }
                n
            }
            Body::Chunked(c) => {
                let n = c
                    .feed(bytes)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if c.is_done() {
                    *self = Body::Done;
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
            let n = this.body.take(&held[..held.len().min(out.remaining())])?;
            out.put_slice(&held[..n]);
            this.at = if matches!(this.body, Body::Done) {
                this.held.len()
            } else {
                this.at + n
            };
            if n > 0 {
                return Poll::Ready(Ok(()));
            }
        }
        loop {
            let before = out.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
            let got = out.filled().len() - before;
            if got == 0 {
                // The client closed (or half-closed) its side: the relay passes that on.
                return Poll::Ready(Ok(()));
            }
            let n = this.body.take(&out.filled()[before..])?;
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
}

impl<R> Answer<R> {
    pub fn new(inner: R) -> Self {
        Answer {
            inner,
            phase: Phase::Head(Vec::new()),
        }
    }
}

fn bad_gateway(why: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{why}\n",
        why.len() + 1
    )
    .into_bytes()
}

impl<R: AsyncRead + Unpin> AsyncRead for Answer<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
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
                            // An interim answer (100 Continue): the real one follows.
                            let after = if code < 200 {
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
                            tracing::debug!(error = %e, "the origin's answer is not an HTTP response");
                            this.phase = Phase::Out {
                                bytes: bad_gateway("the site did not answer with HTTP"),
                                at: 0,
                                next: Box::new(Phase::End),
                            };
                            continue;
                        }
                    }
                    let mut chunk = [0u8; 4096];
                    let mut rb = ReadBuf::new(&mut chunk);
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                    if rb.filled().is_empty() {
                        let why = if buf.is_empty() {
                            "the site closed the connection without an answer"
                        } else {
                            "the site's answer ended inside its head"
                        };
                        this.phase = Phase::Out {
                            bytes: bad_gateway(why),
                            at: 0,
                            next: Box::new(Phase::End),
                        };
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
            let got = read_all(OneRequest::new(held.to_vec(), a, length)).await;
            assert_eq!(got, body, "{length:?}");
        }
    }

    #[tokio::test]
    async fn a_malformed_chunked_body_is_an_error() {
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(b"zz\r\n").await.unwrap();
        let mut r = OneRequest::new(Vec::new(), a, BodyLength::Chunked);
        let err = r.read(&mut [0u8; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    async fn answer(from_origin: &[u8]) -> String {
        let (a, mut b) = tokio::io::duplex(5);
        let sent = from_origin.to_vec();
        tokio::spawn(async move {
            b.write_all(&sent).await.unwrap();
        });
        String::from_utf8(read_all(Answer::new(a)).await).unwrap()
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
        assert!(answer(b"\x16\x03\x01 not http\r\n\r\n")
            .await
            .contains("did not answer with HTTP"));
    }
}
