//! HTTP proxy requests (RFC 9110 section 9.3.6 `CONNECT`, and absolute-form requests of RFC 9112 section 3.2.2), as
//! pure functions over the request head's bytes. The caller reads at most [`MAX_HEAD`] bytes; nothing here panics on
//! any input.

use crate::socks5::domain;
use crate::stream::Host;

/// Largest request head (request line + headers) accepted, in bytes.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header fields accepted in a head.
pub const MAX_HEADERS: usize = 64;
/// Largest response head an origin may send, bytes: sites answer with more and longer headers (cookies) than
/// clients ask with.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Most header fields in a response head.
pub const MAX_RESPONSE_HEADERS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed request head")]
    Malformed,
    #[error("request head is larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("request target must be host:port (CONNECT) or an absolute http:// URL")]
    Target,
    #[error("https:// URLs go through CONNECT")]
    Https,
    #[error("the URL carries credentials (user:password@); send them to the proxy as Proxy-Authorization, to the site as Authorization")]
    Userinfo,
    #[error("more than one Proxy-Authorization header")]
    TwoCredentials,
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error(
        "the message's length is ambiguous or unsupported (Content-Length / Transfer-Encoding)"
    )]
    Framing,
    #[error("this proxy speaks HTTP/1.x (HTTP/2 and later go through CONNECT)")]
    Version,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyTarget {
    /// `CONNECT host:port`: a tunnel.
    Connect,
    /// `GET http://host[:port]/path`: one request forwarded in origin form.
    Forward {
        /// Origin-form target: path and query, at least `/`.
        path: String,
    },
}

/// A parsed proxy request head.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyRequest {
    pub method: String,
    pub target: ProxyTarget,
    pub host: Host,
    pub port: u16,
    /// The `Proxy-Authorization` value, if any.
    pub proxy_authorization: Option<String>,
    /// Every other header, in order, as `(name, value)`; hop-by-hop proxy headers already removed.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The HTTP minor version (0 or 1).
    pub version: u8,
    /// The client may send another request on this connection after this one (RFC 9112 section 9.3): HTTP/1.1
    /// without `close` in its `Connection` or `Proxy-Connection` header. HTTP/1.0 clients get one request per
    /// connection.
    pub persistent: bool,
}

impl std::fmt::Debug for ProxyRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyRequest")
            .field("method", &self.method)
            .field("target", &self.target)
            .field("host", &self.host)
            .field("port", &self.port)
            .field(
                "proxy_authorization",
                &self.proxy_authorization.as_ref().map(|_| "[redacted]"),
            )
            .finish_non_exhaustive()
    }
}

/// Parse `host:port`, `[v6]:port`, or (when `default_port` is given) a bare host.
pub fn parse_authority(s: &str, default_port: Option<u16>) -> Result<(Host, u16), HeadError> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or(HeadError::Target)?;
        let ip: std::net::Ipv6Addr = h.parse().map_err(|_| HeadError::Target)?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(HeadError::Target),
        };
        (Host::V6(ip), port)
    } else {
        let (h, p) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        let host = match h.parse::<std::net::Ipv4Addr>() {
            Ok(a) => Host::V4(a),
            Err(_) => domain(h.as_bytes()).map_err(|_| HeadError::Target)?,
        };
        (host, p)
    };
    let port = match (port, default_port) {
        // Digits only: Rust's integer parser also takes a leading `+`.
        (Some(p), _) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u16>().map_err(|_| HeadError::Target)?
        }
        (Some(_), _) => return Err(HeadError::Target),
        (None, Some(d)) => d,
        (None, None) => return Err(HeadError::Target),
    };
    if port == 0 {
        return Err(HeadError::Target);
    }
    Ok((host, port))
}

/// Headers a proxy consumes or that only concern one hop. Header fields named in a `Connection` header are
/// hop-by-hop too ([`connection_named`]).
fn hop_by_hop(name: &str) -> bool {
    [
        "proxy-authorization",
        "proxy-connection",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// The header names listed in the message's `Connection` headers (RFC 9110 section 7.6.1), lower-cased.
fn connection_named(headers: &[httparse::Header<'_>]) -> Vec<String> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .filter_map(|v| std::str::from_utf8(v).ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
        .collect()
}

/// Whether a header of a forwarded message stays: not hop-by-hop, not named in its `Connection` headers.
fn forwarded(name: &str, named: &[String]) -> bool {
    !hop_by_hop(name) && !named.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// The fields that say where a message's body ends. They are never hop-by-hop: a `Connection` header naming one
/// would have the next hop read the body with another length than this one, and what is left over as the next
/// message (request smuggling).
fn framing(name: &str) -> bool {
    name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("transfer-encoding")
}

fn head_error(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders,
        _ => HeadError::Malformed,
    }
}

/// The request line (or what has arrived of it), split at spaces, if it has the three parts of one.
fn request_line(buf: &[u8]) -> Option<[&[u8]; 3]> {
    let line = &buf[..buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len())];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let three = [parts.next()?, parts.next()?, parts.next()?];
    parts.next().is_none().then_some(three)
}

/// A request line's version that httparse refused: `Some(at)` for a later HTTP/1 minor version (`HTTP/1.2` to
/// `HTTP/1.9`), where its minor digit is; `None` for another version (`HTTP/2.0`); `Err` when the line is simply
/// malformed.
fn other_version(buf: &[u8]) -> Result<Option<usize>, HeadError> {
    // Empty lines before the request line are skipped (RFC 9112 section 2.2), as httparse does.
    let skipped = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    let [method, target, version] = request_line(&buf[skipped..]).ok_or(HeadError::Malformed)?;
    match version {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', b'2'..=b'9'] => {
            Ok(Some(skipped + method.len() + target.len() + 2 + 7))
        }
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            Ok(None)
        }
        _ => Err(HeadError::Malformed),
    }
}

/// Parse a request head. `Ok(None)`: incomplete (read more, up to [`MAX_HEAD`]).
pub fn parse_head(buf: &[u8]) -> Result<Option<(ProxyRequest, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        // RFC 9112 section 2.3: a later HTTP/1 minor version is understood as the highest one we speak.
        Err(httparse::Error::Version) => match other_version(buf)? {
            Some(at) => {
                let mut as_11 = buf.to_vec();
                as_11[at] = b'1';
                return parse_head(&as_11);
            }
            None => return Err(HeadError::Version),
        },
        Err(e) => return Err(head_error(e)),
    };
    if used > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Malformed);
    };
    let (target, host, port) = if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = parse_authority(path, None)?;
        (ProxyTarget::Connect, host, port)
    } else {
        let lower = path
            .get(..8)
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        if lower.starts_with("https://") {
            return Err(HeadError::Https);
        }
        if !lower.starts_with("http://") {
            return Err(HeadError::Target);
        }
        // A fragment is the client's own business (RFC 9110 section 4.2.5): it never goes to the origin.
        let rest = path[7..].split('#').next().unwrap_or_default();
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(split);
        if authority.contains('@') {
            return Err(HeadError::Userinfo);
        }
        let (host, port) = parse_authority(authority, Some(80))?;
        let path = match tail {
            "" => "/".to_owned(),
            t if t.starts_with('?') => format!("/{t}"),
            t => t.to_owned(),
        };
        (ProxyTarget::Forward { path }, host, port)
    };
    let mut proxy_authorization = None;
    let mut kept = Vec::with_capacity(req.headers.len());
    let named = connection_named(req.headers);
    if named.iter().any(|n| framing(n)) {
        return Err(HeadError::Framing);
    }
    let closing = named.iter().any(|n| n == "close")
        || list_values(
            req.headers.iter().map(|h| (h.name, h.value)),
            "proxy-connection",
        )
        .iter()
        .any(|v| v == "close");
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("proxy-authorization") {
            // Two credentials are ambiguous (which one authenticated?): refused, not the last one taken.
            if proxy_authorization.is_some() {
                return Err(HeadError::TwoCredentials);
            }
            proxy_authorization =
                Some(String::from_utf8(h.value.to_vec()).map_err(|_| HeadError::Malformed)?);
        } else if forwarded(h.name, &named) {
            kept.push((h.name.to_owned(), h.value.to_vec()));
        }
    }
    Ok(Some((
        ProxyRequest {
            method: method.to_owned(),
            target,
            host,
            port,
            proxy_authorization,
            headers: kept,
            version,
            persistent: version == 1 && !closing,
        },
        used,
    )))
}

/// Decode a `Basic` credential into `(username, password)`.
pub fn basic_credentials(value: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let (scheme, b64) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

/// The request head to send to the origin: origin-form target, the client's HTTP version, hop-by-hop headers
/// gone, `Host` set to the URL's authority (RFC 9112 section 3.2.2: a client's own `Host` is replaced), and
/// `Connection: close` (one request per proxied connection).
pub fn origin_head(req: &ProxyRequest, path: &str) -> Vec<u8> {
    let mut out = origin_request(req, path);
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

/// [`origin_head`] without its `Connection: close` and the empty line that ends it.
fn origin_request(req: &ProxyRequest, path: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(if req.version == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    out.extend_from_slice(b"Host: ");
    out.extend_from_slice(req.host.to_string().as_bytes());
    if req.port != 80 {
        out.extend_from_slice(format!(":{}", req.port).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    let hops = max_forwards(req);
    for (n, v) in req
        .headers
        .iter()
        .filter(|(n, _)| !n.eq_ignore_ascii_case("host"))
    {
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        match hops {
            // One hop fewer for the next recipient (RFC 9110 section 7.6.2).
            Some(left) if left > 0 && n.eq_ignore_ascii_case("max-forwards") => {
                out.extend_from_slice((left - 1).to_string().as_bytes());
            }
            _ => out.extend_from_slice(v),
        }
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A forwarded `OPTIONS` or `TRACE` request's `Max-Forwards` (RFC 9110 section 7.6.2; no other method has one),
/// when it is one number.
fn max_forwards(req: &ProxyRequest) -> Option<u64> {
    // Methods are case-sensitive (RFC 9110 section 9.1): `trace` is another method.
    if !["OPTIONS", "TRACE"].contains(&req.method.as_str()) {
        return None;
    }
    let values = list_values(
        req.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
        "max-forwards",
    );
    match values.as_slice() {
        [one] => decimal(one),
        _ => None,
    }
}

/// The answer the proxy gives itself, as the request's final recipient, to an `OPTIONS` or `TRACE` whose
/// `Max-Forwards` is 0 (RFC 9110 section 7.6.2): what it allows, or the request echoed back (`message/http`) without
/// the fields that carry credentials (section 9.3.8). `None`: the request goes on.
pub fn answer_here(req: &ProxyRequest) -> Option<Vec<u8>> {
    let ProxyTarget::Forward { path } = &req.target else {
        return None;
    };
    if max_forwards(req) != Some(0) {
        return None;
    }
    if req.method == "OPTIONS" {
        return Some(
            b"HTTP/1.1 200 OK\r\nAllow: GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE, CONNECT\r\n\
              Content-Length: 0\r\nConnection: close\r\n\r\n"
                .to_vec(),
        );
    }
    // As it would have gone on, but without the `Connection: close` that [`origin_head`] adds.
    let echo = String::from_utf8_lossy(&origin_request(req, path))
        .lines()
        .filter(|l| {
            let name = l.split(':').next().unwrap_or_default().trim();
            !["authorization", "cookie"]
                .iter()
                .any(|s| name.eq_ignore_ascii_case(s))
        })
        .map(|l| format!("{l}\r\n"))
        .collect::<String>()
        + "\r\n";
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: message/http\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        echo.len()
    )
    .into_bytes();
    out.extend_from_slice(echo.as_bytes());
    Some(out)
}

/// How a message's body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// No body: the message ends with its head.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`, ending with the last chunk and its trailers.
    Chunked,
    /// Until the sender closes the connection (a response only: one without a length, or with a transfer coding
    /// that does not end in `chunked`).
    UntilClose,
}

/// The framing of a request's body. Ambiguous framing is refused rather than guessed, since the origin might read
/// the message differently (request smuggling): both `Transfer-Encoding` and `Content-Length`, a transfer coding
/// that does not end in `chunked`, or `Content-Length` values that disagree.
pub fn request_body(req: &ProxyRequest) -> Result<BodyLength, HeadError> {
    let headers = || req.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice()));
    let codings = list_values(headers(), "transfer-encoding");
    let lengths = list_values(headers(), "content-length");
    if !codings.is_empty() {
        // HTTP/1.0 has no transfer codings (RFC 9112 section 6.1: such framing is faulty).
        if req.version == 0
            || !lengths.is_empty()
            || codings.last().map(String::as_str) != Some("chunked")
        {
            return Err(HeadError::Framing);
        }
        return Ok(BodyLength::Chunked);
    }
    match content_length(&lengths)? {
        None | Some(0) => Ok(BodyLength::None),
        Some(n) => Ok(BodyLength::Length(n)),
    }
}

/// The comma-separated elements of every `name` field among `headers`, trimmed and lower-cased.
fn list_values<'a>(headers: impl Iterator<Item = (&'a str, &'a [u8])>, name: &str) -> Vec<String> {
    headers
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(|&b| b == b','))
        .map(|v| String::from_utf8_lossy(v).trim().to_ascii_lowercase())
        .collect()
}

/// The one length that `Content-Length` elements give (RFC 9112 section 6.3: repeated equal values count once),
/// `None` without any; values that disagree or are not a number are [`HeadError::Framing`].
fn content_length(lengths: &[String]) -> Result<Option<u64>, HeadError> {
    let Some(first) = lengths.first() else {
        return Ok(None);
    };
    if lengths.iter().any(|l| l != first) {
        return Err(HeadError::Framing);
    }
    decimal(first).map(Some).ok_or(HeadError::Framing)
}

/// A field value that is one decimal number: digits only (Rust's parser would also take a leading `+`).
fn decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// An origin's response head, rewritten for the client ([`client_response_head`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The head as the client gets it.
    pub head: Vec<u8>,
    pub code: u16,
    /// How many bytes of the origin's answer the head took.
    pub used: usize,
    /// Where the body that follows ends (for an interim 1xx answer: [`BodyLength::None`], another head follows).
    pub body: BodyLength,
    /// The client's connection may carry its next request once this answer's body has ended.
    pub persistent: bool,
}

impl ResponseHead {
    /// An interim answer (`100 Continue`, `103 Early Hints`): the final one follows. `101` is final: it would switch
    /// protocols (but `Upgrade` never reaches the origin).
    pub fn interim(&self) -> bool {
        interim(self.code)
    }
}

fn interim(code: u16) -> bool {
    code < 200 && code != 101
}

/// Parse an origin's response head and rewrite it for the client: `HTTP/1.1`, the status, the origin's headers
/// without hop-by-hop ones, and — on a final (non-1xx) answer that ends the client's connection — `Connection:
/// close`. The connection stays (`persistent`) when the client asked for that (`client_persistent`, see
/// [`ProxyRequest::persistent`]) and the body's end can be told without a close; `head_request`: the request was
/// `HEAD`, whose answer has no body whatever its headers say. `Ok(None)`: incomplete (read more, up to
/// [`MAX_RESPONSE_HEAD`]).
/// Origins are parsed leniently where that is safe (a space before a header's colon, folded header lines, extra
/// spaces in the status line), since the client would have accepted the answer from them directly.
pub fn client_response_head(
    buf: &[u8],
    head_request: bool,
    client_persistent: bool,
) -> Result<Option<ResponseHead>, HeadError> {
    let mut headers = vec![httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let parsed = httparse::ParserConfig::default()
        .allow_spaces_after_header_name_in_responses(true)
        .allow_obsolete_multiline_headers_in_responses(true)
        .allow_multiple_spaces_in_response_status_delimiters(true)
        .parse_response(&mut resp, buf);
    let used = match parsed {
        Ok(httparse::Status::Complete(n)) if n <= MAX_RESPONSE_HEAD => n,
        Ok(httparse::Status::Complete(_)) => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_RESPONSE_HEAD => {
            return Err(HeadError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(head_error(e)),
    };
    // A status outside 100–599 has no meaning a client would agree on (is `099` interim?).
    let code = resp
        .code
        .filter(|c| (100..=599).contains(c))
        .ok_or(HeadError::Malformed)?;
    // RFC 9112 section 6.3: with a transfer coding, `Content-Length` is meaningless and a proxy that passes the
    // answer on removes it; without one, a `Content-Length` that is not one number gets the client a 502 instead
    // of an answer it would read with the wrong length.
    let fields = || resp.headers.iter().map(|h| (h.name, h.value));
    let codings = list_values(fields(), "transfer-encoding");
    let coded = !codings.is_empty();
    let length = if coded {
        None
    } else {
        content_length(&list_values(fields(), "content-length"))?
    };
    let interim = interim(code);
    let body = if code == 101 {
        BodyLength::UntilClose
    } else if interim || head_request || code == 204 || code == 304 {
        BodyLength::None
    } else if coded {
        if codings.last().map(String::as_str) == Some("chunked") {
            BodyLength::Chunked
        } else {
            BodyLength::UntilClose
        }
    } else {
        match length {
            Some(0) => BodyLength::None,
            Some(n) => BodyLength::Length(n),
            None => BodyLength::UntilClose,
        }
    };
    let persistent = client_persistent && body != BodyLength::UntilClose;
    let named = connection_named(resp.headers);
    let mut out = Vec::with_capacity(used + 24);
    out.extend_from_slice(format!("HTTP/1.1 {code} {}\r\n", resp.reason.unwrap_or("")).as_bytes());
    for h in resp.headers.iter().filter(|h| {
        (forwarded(h.name, &named) || framing(h.name))
            && !(coded && h.name.eq_ignore_ascii_case("content-length"))
    }) {
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        // A folded value's line breaks become spaces (RFC 9112 section 5.2).
        out.extend(
            h.value
                .iter()
                .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
        out.extend_from_slice(b"\r\n");
    }
    if !interim && !persistent {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(ResponseHead {
        head: out,
        code,
        used,
        body,
        persistent,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn connect_heads() {
        let head = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Authorization: Basic dTpw\r\n\r\nxyz";
        let (r, used) = parse_head(head).unwrap().unwrap();
        assert_eq!(used, head.len() - 3);
        assert_eq!(
            (r.target.clone(), r.host.clone(), r.port),
            (
                ProxyTarget::Connect,
                Host::Domain("example.com".into()),
                443
            )
        );
        assert_eq!(
            basic_credentials(r.proxy_authorization.as_deref().unwrap()),
            Some(("u".into(), "p".into()))
        );
        assert!(!format!("{r:?}").contains("dTpw"));
        let (r, _) = parse_head(b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((r.host, r.port), (Host::V6(Ipv6Addr::LOCALHOST), 8443));
        assert_eq!(
            parse_head(b"CONNECT example.com HTTP/1.1\r\n\r\n"),
            Err(HeadError::Target)
        );
        assert_eq!(
            parse_head(b"CONNECT a b:1 HTTP/1.1\r\n\r\n"),
            Err(HeadError::Malformed)
        );
        assert_eq!(
            parse_head(b"CONNECT 1.2.3.4:+80 HTTP/1.1\r\n\r\n"),
            Err(HeadError::Target)
        );
        assert_eq!(
            parse_head(b"CONNECT 1.2.3.4:0 HTTP/1.1\r\n\r\n"),
            Err(HeadError::Target)
        );
        assert_eq!(
            parse_head(b"CONNECT [::1:80 HTTP/1.1\r\n\r\n"),
            Err(HeadError::Target)
        );
        assert_eq!(
            parse_head(b"GET http://bob:pw@example.com/ HTTP/1.1\r\n\r\n"),
            Err(HeadError::Userinfo)
        );
        assert_eq!(
            parse_head(
                b"CONNECT a.com:443 HTTP/1.1\r\nProxy-Authorization: Basic eDp5\r\nProxy-Authorization: Basic dTpw\r\n\r\n"
            ),
            Err(HeadError::TwoCredentials)
        );
    }

    #[test]
    fn absolute_form_heads_become_origin_form() {
        let head = b"GET http://10.1.2.3:8080/a?b=c HTTP/1.1\r\nHost: 10.1.2.3:8080\r\nProxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n";
        let (r, _) = parse_head(head).unwrap().unwrap();
        assert_eq!(
            (r.host.clone(), r.port),
            (Host::V4(Ipv4Addr::new(10, 1, 2, 3)), 8080)
        );
        let ProxyTarget::Forward { path } = &r.target else {
            panic!("forward expected")
        };
        assert_eq!(path, "/a?b=c");
        let out = String::from_utf8(origin_head(&r, path)).unwrap();
        assert_eq!(out, "GET /a?b=c HTTP/1.1\r\nHost: 10.1.2.3:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n");
        let (r, _) = parse_head(b"GET http://Example.org HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.target, ProxyTarget::Forward { path: "/".into() });
        for (url, want) in [
            ("http://a.com/x?y=1#part", "/x?y=1"),
            ("http://a.com#top", "/"),
        ] {
            let head = format!("GET {url} HTTP/1.1\r\n\r\n");
            let (f, _) = parse_head(head.as_bytes()).unwrap().unwrap();
            assert_eq!(
                f.target,
                ProxyTarget::Forward { path: want.into() },
                "{url}"
            );
        }
        assert!(String::from_utf8(origin_head(&r, "/"))
            .unwrap()
            .contains("Host: example.org\r\n"));
        assert_eq!(
            parse_head(b"GET /local HTTP/1.1\r\n\r\n"),
            Err(HeadError::Target)
        );
        assert_eq!(
            parse_head(b"GET https://x.org/ HTTP/1.1\r\n\r\n"),
            Err(HeadError::Https)
        );
        assert_eq!(
            parse_head(b"GET http://u:p@x.org/ HTTP/1.1\r\n\r\n"),
            Err(HeadError::Userinfo)
        );
    }

    #[test]
    fn incomplete_and_oversized_heads() {
        assert_eq!(parse_head(b"CONNECT a.b:1 HTTP/1.1\r\nHost: a"), Ok(None));
        let mut big = b"GET http://a.b/ HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert_eq!(parse_head(&big), Err(HeadError::TooLarge));
        let mut many = b"GET http://a.b/ HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse_head(&many), Err(HeadError::TooManyHeaders));
    }

    /// A later HTTP/1 minor version is read as HTTP/1.1 (RFC 9112 section 2.3), also while it arrives; other
    /// versions are refused as such, not as malformed.
    #[test]
    fn later_http1_versions_are_read_as_11() {
        let (r, used) = parse_head(b"GET http://a.b/ HTTP/1.2\r\nX: y\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((r.version, used), (1, 34));
        assert_eq!(parse_head(b"GET http://a.b/ HTTP/1.7"), Ok(None));
        let (r, used) = parse_head(b"\r\nGET http://a.b/ HTTP/1.3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((r.version, used), (1, 30));
        assert_eq!(parse_head(b"GET http://a.b/ HTTP/1.7\r\nX"), Ok(None));
        for other in [
            &b"PRI * HTTP/2.0\r\n\r\n"[..],
            b"GET http://a.b/ HTTP/3.1\r\n\r\n",
        ] {
            assert_eq!(parse_head(other), Err(HeadError::Version));
        }
        for malformed in [
            &b"GET http://a.b/ HTTP/1.x\r\n\r\n"[..],
            b"GET http://a.b/ HTTP/1.2 more\r\n\r\n",
            b"GET http://a.b/ HTTP/1.\r\n\r\n",
        ] {
            assert_eq!(parse_head(malformed), Err(HeadError::Malformed));
        }
    }

    /// `OPTIONS` and `TRACE` count `Max-Forwards` down, and at 0 the proxy answers them itself: a `TRACE` echo
    /// never carries credentials. Other methods, and requests without the field, go on unchanged.
    #[test]
    fn max_forwards_is_counted_down_and_ends_at_the_proxy() {
        let (r, out) = forward(b"OPTIONS http://a.b/ HTTP/1.1\r\nMax-Forwards: 3\r\n\r\n");
        assert!(out.contains("\r\nMax-Forwards: 2\r\n"), "{out}");
        assert_eq!(answer_here(&r), None);
        let (r, out) = forward(b"GET http://a.b/ HTTP/1.1\r\nMax-Forwards: 0\r\n\r\n");
        assert!(out.contains("\r\nMax-Forwards: 0\r\n"), "{out}");
        assert_eq!(answer_here(&r), None);
        let (r, _) = forward(b"trace http://a.b/ HTTP/1.1\r\nMax-Forwards: 0\r\n\r\n");
        assert_eq!(
            answer_here(&r),
            None,
            "another method: methods are case-sensitive"
        );
        let (r, _) = forward(b"OPTIONS http://a.b/ HTTP/1.1\r\nMax-Forwards: 0\r\n\r\n");
        let here = String::from_utf8(answer_here(&r).unwrap()).unwrap();
        assert!(
            here.starts_with("HTTP/1.1 200 OK\r\nAllow: ") && here.ends_with("\r\n\r\n"),
            "{here}"
        );
        let (r, _) = forward(
            b"TRACE http://a.b/t HTTP/1.1\r\nProxy-Authorization: Basic dTpw\r\nAuthorization: Basic c2VjcmV0\r\n\
              Cookie: s=1\r\nMax-Forwards: 0\r\nX-Probe: 1\r\n\r\n",
        );
        let here = String::from_utf8(answer_here(&r).unwrap()).unwrap();
        let (head, echo) = here.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("Content-Type: message/http"), "{head}");
        assert!(
            head.contains(&format!("Content-Length: {}", echo.len())),
            "{head}"
        );
        assert_eq!(
            echo,
            "TRACE /t HTTP/1.1\r\nHost: a.b\r\nMax-Forwards: 0\r\nX-Probe: 1\r\n\r\n"
        );
        for not_one in ["Max-Forwards: x\r\n", "Max-Forwards: 0, 1\r\n", ""] {
            let head = format!("TRACE http://a.b/ HTTP/1.1\r\n{not_one}\r\n");
            assert_eq!(answer_here(&forward(head.as_bytes()).0), None, "{not_one}");
        }
    }

    fn forward(head: &[u8]) -> (ProxyRequest, String) {
        let (r, _) = parse_head(head).unwrap().unwrap();
        let ProxyTarget::Forward { path } = r.target.clone() else {
            panic!("forward expected")
        };
        let out = String::from_utf8(origin_head(&r, &path)).unwrap();
        (r, out)
    }

    /// The URL's authority replaces the client's `Host`; headers the client's `Connection` names stay on its hop;
    /// an HTTP/1.0 request goes on as HTTP/1.0 (so the origin answers without chunked coding).
    #[test]
    fn the_origin_sees_the_urls_host_and_no_hop_headers() {
        let (_, out) = forward(
            b"GET http://[::1]:8080/x HTTP/1.1\r\nHost: other.example\r\nConnection: X-Secret, keep-alive\r\n\
              X-Secret: hop-only\r\nAccept: */*\r\n\r\n",
        );
        assert_eq!(
            out,
            "GET /x HTTP/1.1\r\nHost: [::1]:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let (_, out) = forward(b"GET http://a.example/ HTTP/1.0\r\n\r\n");
        assert_eq!(
            out,
            "GET / HTTP/1.0\r\nHost: a.example\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn request_bodies_are_framed_or_refused() {
        let body = |extra: &str| {
            let head = format!("POST http://a.example/ HTTP/1.1\r\n{extra}\r\n");
            request_body(&forward(head.as_bytes()).0)
        };
        assert_eq!(body(""), Ok(BodyLength::None));
        assert_eq!(body("Content-Length: 0\r\n"), Ok(BodyLength::None));
        assert_eq!(body("Content-Length: 12\r\n"), Ok(BodyLength::Length(12)));
        assert_eq!(
            body("Content-Length: 12\r\ncontent-length: 12, 12\r\n"),
            Ok(BodyLength::Length(12))
        );
        assert_eq!(
            body("Transfer-Encoding: gzip, Chunked\r\n"),
            Ok(BodyLength::Chunked)
        );
        for bad in [
            "Content-Length: 12\r\nContent-Length: 13\r\n",
            "Content-Length: +12\r\n",
            "Content-Length: 99999999999999999999999\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
            "Transfer-Encoding: chunked, gzip\r\n",
        ] {
            assert_eq!(body(bad), Err(HeadError::Framing), "{bad}");
        }
        let head = b"POST http://a.example/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(request_body(&forward(head).0), Err(HeadError::Framing));
    }

    /// `client_response_head` for a `GET` whose client keeps its connection (`persistent`) or not.
    fn response(raw: &[u8], persistent: bool) -> Result<Option<ResponseHead>, HeadError> {
        client_response_head(raw, false, persistent)
    }

    /// The origin's hop headers stay behind; the client is told the connection ends with this answer unless it
    /// asked to keep it.
    #[test]
    fn responses_reach_the_client_without_the_origins_hop_headers() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\n\
                    X-Hop: 1\r\nServer: t\r\n\r\nbody";
        let h = response(raw, false).unwrap().unwrap();
        assert_eq!((h.code, &raw[h.used..]), (200, &b"body"[..]));
        assert_eq!((h.body, h.persistent), (BodyLength::Length(4), false));
        assert_eq!(
            String::from_utf8(h.head).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nServer: t\r\nConnection: close\r\n\r\n"
        );
        let h = response(raw, true).unwrap().unwrap();
        assert!(h.persistent);
        assert_eq!(
            String::from_utf8(h.head).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nServer: t\r\n\r\n"
        );
        let h = response(b"HTTP/1.1 100 Continue\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(h.interim());
        assert_eq!(
            (h.head, h.code),
            (b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(), 100)
        );
        assert_eq!(response(b"HTTP/1.1 200 OK\r\nA: b", true), Ok(None));
        assert_eq!(
            response(b"SSH-2.0-OpenSSH\r\n\r\n", true),
            Err(HeadError::Malformed)
        );
        // What browsers accept from sites passes: many cookies, a space before a colon, a folded line, a double
        // space in the status line.
        let mut many = b"HTTP/1.1  200 OK\r\nServer : t\r\nX-Long: a\r\n b\r\n".to_vec();
        for i in 0..100 {
            many.extend_from_slice(format!("Set-Cookie: c{i}=v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let h = response(&many, false).unwrap().unwrap();
        let out = String::from_utf8(h.head).unwrap();
        assert_eq!((h.code, h.used), (200, many.len()));
        assert!(
            out.contains("Server: t\r\nX-Long: a   b\r\n") && out.contains("Set-Cookie: c99=v\r\n"),
            "{out}"
        );
    }

    /// Where an answer's body ends (RFC 9112 section 6.3), and so whether the client's connection can carry another
    /// request after it: not when only the origin's close ends the body.
    #[test]
    fn a_response_says_where_its_body_ends() {
        for (raw, head_request, body) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"[..],
                false,
                BodyLength::Length(9),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
                true,
                BodyLength::None,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                false,
                BodyLength::None,
            ),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false, BodyLength::None),
            (
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false,
                BodyLength::None,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                false,
                BodyLength::Chunked,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                true,
                BodyLength::None,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                false,
                BodyLength::UntilClose,
            ),
            (b"HTTP/1.1 200 OK\r\n\r\n", false, BodyLength::UntilClose),
            (
                b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\n",
                false,
                BodyLength::UntilClose,
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                false,
                BodyLength::UntilClose,
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                true,
                BodyLength::UntilClose,
            ),
            // A framing field named in `Connection` still frames the body, and still reaches the client.
            (
                b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 3\r\n\r\n",
                false,
                BodyLength::Length(3),
            ),
        ] {
            let what = String::from_utf8_lossy(raw).into_owned();
            let h = client_response_head(raw, head_request, true)
                .unwrap()
                .unwrap();
            assert_eq!(h.body, body, "{what}");
            let stays = body != BodyLength::UntilClose;
            assert_eq!(h.persistent, stays, "{what}");
            let out = String::from_utf8(h.head).unwrap();
            assert_eq!(out.ends_with("Connection: close\r\n\r\n"), !stays, "{what}");
            if let BodyLength::Length(n) = body {
                assert!(out.contains(&format!("Content-Length: {n}\r\n")), "{out}");
            }
        }
        // A status a client might read as interim or as final (`099`), or none at all, is not an answer.
        for raw in [
            &b"HTTP/1.1 099 Odd\r\n\r\n"[..],
            b"HTTP/1.1 600 Odd\r\n\r\n",
            b"HTTP/1.1 000 x\r\n\r\n",
        ] {
            assert_eq!(
                response(raw, true),
                Err(HeadError::Malformed),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    /// A client keeps its connection for another request unless it is HTTP/1.0 or says `close`.
    #[test]
    fn a_request_says_whether_its_connection_stays() {
        for (head, persistent) in [
            (&b"GET http://a.example/ HTTP/1.1\r\n\r\n"[..], true),
            (
                b"GET http://a.example/ HTTP/1.1\r\nProxy-Connection: Keep-Alive\r\n\r\n",
                true,
            ),
            (
                b"GET http://a.example/ HTTP/1.1\r\nConnection: TE, Close\r\n\r\n",
                false,
            ),
            (
                b"GET http://a.example/ HTTP/1.1\r\nProxy-Connection: close\r\n\r\n",
                false,
            ),
            (
                b"GET http://a.example/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                false,
            ),
        ] {
            let (req, _) = parse_head(head).unwrap().unwrap();
            assert_eq!(
                req.persistent,
                persistent,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        // A request that names its framing as hop-by-hop would reach the origin without it, and its body would be
        // read here as the next request: refused.
        for head in [
            &b"POST http://a.example/ HTTP/1.1\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\n"[..],
            b"POST http://a.example/ HTTP/1.1\r\nConnection: x, Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(parse_head(head), Err(HeadError::Framing), "{}", String::from_utf8_lossy(head));
        }
    }

    /// An answer whose length the client would read differently from the origin gets a 502; with a transfer
    /// coding, its `Content-Length` is dropped.
    #[test]
    fn responses_with_a_bad_length_are_refused_or_mended() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        ] {
            assert_eq!(
                response(bad, true),
                Err(HeadError::Framing),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let h = response(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(h.body, BodyLength::Length(5));
        assert!(String::from_utf8(h.head)
            .unwrap()
            .contains("Content-Length: 5, 5\r\n"));
        let h = response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            String::from_utf8(h.head).unwrap(),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn basic_credentials_are_strict() {
        assert_eq!(
            basic_credentials("Basic dTpwOnE="),
            Some(("u".into(), "p:q".into()))
        );
        assert_eq!(basic_credentials("Bearer dTpw"), None);
        assert_eq!(basic_credentials("Basic !!!"), None);
        assert_eq!(basic_credentials("Basic dXNlcg=="), None);
    }

    proptest! {
        #[test]
        fn no_head_panics(buf in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(Some((r, used))) = parse_head(&buf) {
                prop_assert!(used <= buf.len());
                let _ = origin_head(&r, "/");
                let _ = request_body(&r);
            }
            if let Ok(Some(h)) = client_response_head(&buf, false, true) {
                prop_assert!(h.used <= buf.len());
            }
        }
    }
}
