//! The HTTP proxy door: `CONNECT host:port` tunnels and absolute-form requests (`GET http://…`), with
//! `Proxy-Authorization: Basic`.

use std::net::SocketAddr;
use std::sync::Arc;

use proxyfleet_proto::http_proxy::{self as hp, HeadError, ProxyTarget};
use proxyfleet_proto::Target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::directory::Entry;
use super::relay::{close_customer, close_customer_halves, relay};
use super::{AuthFailure, Door, ProxyContext};

mod forward;

/// Read the request head (bounded by [`hp::MAX_HEAD`]), after `buf` (bytes already read from the client); returns
/// it and the bytes after it.
async fn read_head(
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
) -> anyhow::Result<Result<(hp::ProxyRequest, Vec<u8>), HeadError>> {
    let mut chunk = [0u8; 4096];
    loop {
        if !buf.is_empty() {
            match hp::parse_head(&buf) {
                Ok(Some((req, used))) => return Ok(Ok((req, buf.split_off(used)))),
                Ok(None) if buf.len() < hp::MAX_HEAD => {}
                Ok(None) => return Ok(Err(HeadError::TooLarge)),
                Err(e) => return Ok(Err(e)),
            }
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!("client closed before a whole request head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A short plain-text answer that ends the connection: `status`, `extra` header lines, then `body`.
fn plain_answer(status: u16, extra: &str, body: &str) -> Vec<u8> {
    let reason = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}\n",
        body.len() + 1
    )
    .into_bytes()
}

/// Send [`plain_answer`] and end the connection.
async fn respond(
    stream: &mut TcpStream,
    status: u16,
    extra: &str,
    body: &str,
) -> std::io::Result<()> {
    stream.write_all(&plain_answer(status, extra, body)).await?;
    let _ = stream.shutdown().await;
    Ok(())
}

async fn auth(
    ctx: &ProxyContext,
    req: &hp::ProxyRequest,
    peer: SocketAddr,
    door: &Door,
) -> Result<Arc<Entry>, AuthFailure> {
    let client = peer.ip().to_canonical();
    if let Some(e) = ctx.allow_listed(door, client) {
        return Ok(e);
    }
    let (user, pass) = req
        .proxy_authorization
        .as_deref()
        .and_then(hp::basic_credentials)
        .ok_or(AuthFailure::Invalid)?;
    ctx.authenticate(door, &user, &pass, client).await
}

/// What became of the client's connection after one request.
enum Next {
    /// It is over (closed, or handed to a tunnel that ended).
    Closed,
    /// It carries the client's next request, which begins with these bytes (if any arrived yet).
    Persist(TcpStream, Vec<u8>),
}

/// Serve a client's connection: one request, or one after another while the answers let it stay open
/// (persistent connections, RFC 9112 section 9.3). Each request is authenticated and admitted on its own.
/// `port_stop`: the listener's own stop (a dedicated port the operator removed), after which no next request is
/// read.
pub async fn serve(
    ctx: &Arc<ProxyContext>,
    mut stream: TcpStream,
    peer: SocketAddr,
    door: &Door,
    port_stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut held = Vec::new();
    loop {
        match request(ctx, stream, std::mem::take(&mut held), peer, door).await? {
            Next::Closed => return Ok(()),
            Next::Persist(s, mut next) => {
                // Line ends a client sends after a body (RFC 9112 section 2.2) are not yet a request.
                let blank = next
                    .iter()
                    .take_while(|&&b| b == b'\r' || b == b'\n')
                    .count();
                next.drain(..blank);
                if next.is_empty() && !next_request(ctx, &s, port_stop).await {
                    close_customer(&s, false).await;
                    return Ok(());
                }
                (stream, held) = (s, next);
            }
        }
    }
}

/// Wait for a persistent connection's next request: true once its first byte is there; false when the client
/// closes, sends nothing for the keep-alive timeout, or the server or the port stops.
async fn next_request(
    ctx: &ProxyContext,
    stream: &TcpStream,
    port_stop: &CancellationToken,
) -> bool {
    let mut first = [0u8; 1];
    tokio::select! {
        r = tokio::time::timeout(ctx.keep_alive_timeout, stream.peek(&mut first)) => matches!(r, Ok(Ok(1))),
        () = ctx.shutdown.cancelled() => false,
        () = port_stop.cancelled() => false,
    }
}

/// One request on the client's connection, whose first bytes (`held`) may already have been read.
async fn request(
    ctx: &Arc<ProxyContext>,
    mut stream: TcpStream,
    held: Vec<u8>,
    peer: SocketAddr,
    door: &Door,
) -> anyhow::Result<Next> {
    let Some(head) = ctx.handshake(read_head(&mut stream, held)).await else {
        // Say why the connection closes (not when the server is stopping: it owes nobody an answer then).
        if !ctx.shutdown.is_cancelled() {
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                respond(&mut stream, 408, "", "request head timed out"),
            )
            .await;
        }
        anyhow::bail!("HTTP proxy request head timed out (or the server is stopping)");
    };
    let head = head?;
    let (req, rest) = match head {
        Ok(h) => h,
        Err(e) => {
            let status = match e {
                HeadError::TooLarge | HeadError::TooManyHeaders => 431,
                HeadError::Version => 505,
                _ => 400,
            };
            respond(&mut stream, status, "", &e.to_string()).await?;
            return Ok(Next::Closed);
        }
    };
    // A forwarded request's body must have one clear length before anything is opened for it.
    let body = match (&req.target, hp::request_body(&req)) {
        (ProxyTarget::Forward { .. }, Err(e)) => {
            respond(&mut stream, 400, "", &e.to_string()).await?;
            return Ok(Next::Closed);
        }
        (_, b) => b.unwrap_or(hp::BodyLength::None),
    };
    let entry = match ctx.handshake(auth(ctx, &req, peer, door)).await {
        Some(Ok(e)) => e,
        Some(Err(AuthFailure::Invalid)) => {
            let challenge = "Proxy-Authenticate: Basic realm=\"proxyfleet\", charset=\"UTF-8\"\r\n";
            respond(&mut stream, 407, challenge, "proxy authentication required").await?;
            return Ok(Next::Closed);
        }
        Some(Err(AuthFailure::Limited(after))) => {
            let retry = format!("Retry-After: {}\r\n", after.as_secs().max(1));
            respond(
                &mut stream,
                429,
                &retry,
                "too many failed authentications; try again later",
            )
            .await?;
            return Ok(Next::Closed);
        }
        Some(Err(AuthFailure::Unavailable)) | None => {
            respond(
                &mut stream,
                503,
                "Retry-After: 1\r\n",
                "authentication is busy; try again",
            )
            .await?;
            return Ok(Next::Closed);
        }
    };
    // An OPTIONS or TRACE that may go no further: the proxy is its final recipient, and no flow is opened (but a
    // connection that may not be used says so, as for any request).
    if let Some(answer) = hp::answer_here(&req) {
        if let Err(r) = entry.admit() {
            respond(&mut stream, 403, "", r.reason()).await?;
            return Ok(Next::Closed);
        }
        stream.write_all(&answer).await?;
        close_customer(&stream, false).await;
        return Ok(Next::Closed);
    }
    let target = Target::Tcp {
        host: req.host.clone(),
        port: req.port,
    };
    let (flow, dr, dw) = match ctx.open(&entry, target).await {
        Ok(f) => f,
        Err(e) => {
            let (status, reason) = e.http();
            respond(&mut stream, status, "", reason).await?;
            return Ok(Next::Closed);
        }
    };
    let (first, opts) = match &req.target {
        ProxyTarget::Connect => {
            stream
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
            (rest, ctx.relay_options(false))
        }
        ProxyTarget::Forward { path } => {
            // The origin gets this request and its body, never what the client sends after it: that is kept for
            // the next round, which authenticates and opens anew.
            let (cr, cw) = stream.into_split();
            let exchange = Arc::new(forward::Exchange::default());
            let up = forward::OneRequest::new(rest, cr, body, exchange.clone());
            let down = forward::Answer::new(dr, exchange.clone(), &req);
            let opts = ctx.relay_options(true);
            let ended = relay(
                &ctx.dir,
                &flow,
                (up, cw),
                (down, dw),
                &hp::origin_head(&req, path),
                opts,
            )
            .await;
            drop(flow);
            let (cr, next) = ended.cr.finish();
            let Ok(s) = cr.reunite(ended.cw) else {
                return Ok(Next::Closed);
            };
            return Ok(match next {
                Some(next) if !ended.broken && exchange.reusable() => Next::Persist(s, next),
                _ => {
                    close_customer(&s, ended.broken).await;
                    Next::Closed
                }
            });
        }
    };
    let ended = relay(&ctx.dir, &flow, stream.into_split(), (dr, dw), &first, opts).await;
    close_customer_halves(ended).await;
    Ok(Next::Closed)
}
