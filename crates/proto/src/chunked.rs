//! Where a `Transfer-Encoding: chunked` body ends (RFC 9112 section 7.1), found while its bytes pass through
//! unchanged. The HTTP proxy door forwards exactly one request per origin connection, so it must know where a chunked
//! upload or answer stops; nothing is decoded or buffered beyond one line.

/// Longest chunk-size line (size and extensions) or trailer line, bytes.
pub const MAX_LINE: usize = 4096;
/// Most trailer bytes after the last chunk.
pub const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkedError {
    #[error("malformed chunk size line")]
    Size,
    #[error("chunk data not followed by CRLF")]
    DataEnd,
    #[error("chunk line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("trailers longer than {MAX_TRAILERS} bytes")]
    TrailersTooLong,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Reading a chunk-size line.
    Size,
    /// Inside a chunk's data: bytes left.
    Data(u64),
    /// After a chunk's data: the CR, then the LF.
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    Done,
}

/// Follows a chunked body; feed it the bytes in order.
#[derive(Debug, Clone)]
pub struct ChunkedEnd {
    state: State,
    line: Vec<u8>,
    trailers: usize,
    lenient: bool,
}

impl Default for ChunkedEnd {
    fn default() -> Self {
        ChunkedEnd {
            state: State::Size,
            line: Vec::new(),
            trailers: 0,
            lenient: false,
        }
    }
}

impl ChunkedEnd {
    /// Whether the body has ended.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether the body so far took a form only a lenient reader accepts (a line ended by a bare LF, whitespace
    /// around a chunk size): a strict reader might find its end elsewhere, so nothing after it should be read as
    /// the next message.
    pub fn was_lenient(&self) -> bool {
        self.lenient
    }

    /// Take the next bytes; returns how many of them belong to the body (all of them unless it ends inside
    /// `buf`). Bytes after the end are not consumed.
    pub fn feed(&mut self, buf: &[u8]) -> Result<usize, ChunkedError> {
        let mut i = 0;
        while i < buf.len() {
            match self.state {
                State::Done => break,
                State::Data(left) => {
                    let take = (buf.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data(left)
                    };
                }
                State::DataCr => {
                    if buf[i] != b'\r' {
                        return Err(ChunkedError::DataEnd);
                    }
                    i += 1;
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if buf[i] != b'\n' {
                        return Err(ChunkedError::DataEnd);
                    }
                    i += 1;
                    self.state = State::Size;
                }
                State::Size | State::Trailers => {
                    let b = buf[i];
                    i += 1;
                    if self.state == State::Trailers {
                        self.trailers += 1;
                        if self.trailers > MAX_TRAILERS {
                            return Err(ChunkedError::TrailersTooLong);
                        }
                    }
                    if b != b'\n' {
                        if self.line.len() >= MAX_LINE {
                            return Err(ChunkedError::LineTooLong);
                        }
                        self.line.push(b);
                        continue;
                    }
                    // A line ends at LF; a CR before it is part of the line ending (bare LF is accepted as RFC
                    // 9112 section 2.2 allows).
                    if self.line.last() == Some(&b'\r') {
                        self.line.pop();
                    } else {
                        self.lenient = true;
                    }
                    self.state = if self.state == State::Size {
                        let (size, lenient) = chunk_size(&self.line)?;
                        self.lenient |= lenient;
                        match size {
                            0 => State::Trailers,
                            n => State::Data(n),
                        }
                    } else if self.line.is_empty() {
                        State::Done
                    } else {
                        State::Trailers
                    };
                    self.line.clear();
                    if self.state == State::Done {
                        self.line = Vec::new();
                    }
                }
            }
        }
        Ok(i)
    }
}

/// The size of a chunk-size line: hex digits, then optional whitespace and `;extensions`; and whether whitespace
/// stood where RFC 9112 section 7.1 has none (before the digits, or after them without an extension).
fn chunk_size(line: &[u8]) -> Result<(u64, bool), ChunkedError> {
    let end = line.iter().position(|&b| b == b';').unwrap_or(line.len());
    let digits = line[..end].trim_ascii();
    let lenient = line.first().is_some_and(u8::is_ascii_whitespace)
        || (end == line.len() && line.last().is_some_and(u8::is_ascii_whitespace));
    if digits.is_empty() || digits.len() > 16 {
        return Err(ChunkedError::Size);
    }
    let text = std::str::from_utf8(digits).map_err(|_| ChunkedError::Size)?;
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ChunkedError::Size);
    }
    let size = u64::from_str_radix(text, 16).map_err(|_| ChunkedError::Size)?;
    Ok((size, lenient))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(chunks: &[Vec<u8>], trailers: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks.iter().filter(|c| !c.is_empty()) {
            out.extend_from_slice(format!("{:x};ext=1\r\n", c.len()).as_bytes());
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        out.extend_from_slice(trailers.as_bytes());
        out.extend_from_slice(b"\r\n");
        out
    }

    #[test]
    fn the_end_is_found_and_what_follows_is_left() {
        let body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nGET /next HTTP/1.1\r\n";
        let mut c = ChunkedEnd::default();
        let n = c.feed(body).unwrap();
        assert!(c.is_done());
        assert_eq!(&body[n..], b"GET /next HTTP/1.1\r\n");
        assert_eq!(
            c.feed(b"more").unwrap(),
            0,
            "nothing after the end belongs to the body"
        );
        // Trailers, upper-case hex, bare LF line endings.
        let mut c = ChunkedEnd::default();
        let body = b"A\nabcdefghij\r\n0\nExpires: never\n\nX";
        assert_eq!(c.feed(body).unwrap(), body.len() - 1);
        assert!(c.is_done());
        assert!(c.was_lenient(), "bare LF");
    }

    /// A body only a lenient reader takes says so; a strict one, extensions and their whitespace included, does not.
    #[test]
    fn leniency_is_noticed() {
        let lenient = |body: &[u8]| {
            let mut c = ChunkedEnd::default();
            c.feed(body).unwrap();
            assert!(c.is_done(), "{}", String::from_utf8_lossy(body));
            c.was_lenient()
        };
        assert!(!lenient(b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"));
        assert!(!lenient(b"5 ;ext=1\r\nhello\r\n0\r\n\r\n"));
        for body in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhello\r\n0\r\n\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"5\r\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nX-T: 1\n\r\n",
        ] {
            assert!(lenient(body), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn malformed_bodies_are_refused() {
        for (bad, err) in [
            (&b"x\r\n"[..], ChunkedError::Size),
            (b"\r\n", ChunkedError::Size),
            (b"-1\r\n", ChunkedError::Size),
            (b"11111111111111111\r\n", ChunkedError::Size),
            (b"3\r\nabcX", ChunkedError::DataEnd),
            (b"3\r\nabc\rX", ChunkedError::DataEnd),
        ] {
            assert_eq!(ChunkedEnd::default().feed(bad), Err(err), "{bad:?}");
        }
        let long = vec![b'1'; MAX_LINE + 1];
        assert_eq!(
            ChunkedEnd::default().feed(&long),
            Err(ChunkedError::LineTooLong)
        );
        let mut c = ChunkedEnd::default();
        c.feed(b"0\r\n").unwrap();
        let mut err = None;
        for _ in 0..MAX_TRAILERS {
            if let Err(e) = c.feed(b"X: y\r\n") {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(ChunkedError::TrailersTooLong));
    }

    proptest! {
        /// Any body, split anywhere, ends exactly where its encoding does.
        #[test]
        fn any_split_ends_at_the_end(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..6),
            trailer in proptest::option::of("[a-z]{1,8}: [a-z]{0,8}\r\n"),
            cut in 0usize..2000,
            tail in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            let body = encode(&chunks, trailer.as_deref().unwrap_or(""));
            let mut wire = body.clone();
            wire.extend_from_slice(&tail);
            let cut = cut.min(wire.len());
            let mut c = ChunkedEnd::default();
            let a = c.feed(&wire[..cut]).unwrap();
            let b = c.feed(&wire[a..]).unwrap();
            prop_assert!(c.is_done());
            prop_assert_eq!(a + b, body.len());
        }

        /// Arbitrary bytes never panic and never hold more than one line.
        #[test]
        fn garbage_never_panics(parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 0..8)) {
            let mut c = ChunkedEnd::default();
            for p in &parts {
                match c.feed(p) {
                    Ok(n) => prop_assert!(n <= p.len()),
                    Err(_) => break,
                }
                prop_assert!(c.line.len() <= MAX_LINE);
            }
        }
    }
}
