//! Webhooks: Standard Webhooks signatures, signing secrets encrypted at rest, an HTTP client that refuses private
//! addresses at connect time, and the outbox worker that delivers each event at least once with the same id.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::store::{EventOutcome, EventRow, Store};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Per attempt: connecting may take this long …
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// … and the whole attempt this long.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Waits before each retry (about a day in all); each gets ±20 % jitter.
pub const RETRY_SCHEDULE_SECS: [i64; 11] = [
    5, 30, 120, 600, 1800, 3600, 7200, 14_400, 21_600, 21_600, 21_600,
];
/// How much of a response is kept in the delivery log.
const RESPONSE_HEAD: usize = 512;
/// How long a worker holds an event it is delivering.
const CLAIM_MS: i64 = 60_000;

/// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, where the key is the base64 part of `whsec_…`.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    let key = B64
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .ok()?;
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).ok()?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(format!("v1,{}", B64.encode(mac.finalize().into_bytes())))
}

/// A new signing secret: `whsec_` and 32 random bytes in base64.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("whsec_{}", B64.encode(bytes))
}

/// The server's data key: encrypts secrets that must be stored but never in the clear (webhook signing secrets).
#[derive(Clone)]
pub struct DataKey(Arc<ChaCha20Poly1305>);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey([redacted])")
    }
}

impl DataKey {
    pub fn from_bytes(key: &[u8; 32]) -> Self {
        DataKey(Arc::new(ChaCha20Poly1305::new(key.into())))
    }

    /// `DATA_DIR/data_key` (32 random bytes, mode 0600), created on first run.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Self> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = data_dir.join("data_key");
        match std::fs::read(&path) {
            Ok(b) => {
                let key: [u8; 32] = b
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("{} is not 32 bytes", path.display()))?;
                return Ok(Self::from_bytes(&key));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let key: [u8; 32] = rand::random();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(&key)?;
        f.sync_all()?;
        Ok(Self::from_bytes(&key))
    }

    /// base64(nonce ‖ ciphertext ‖ tag).
    pub fn seal(&self, plain: &str) -> String {
        let nonce: [u8; 12] = rand::random();
        let mut out = nonce.to_vec();
        // Encryption of a short in-memory buffer cannot fail.
        out.extend(
            self.0
                .encrypt(&Nonce::from(nonce), plain.as_bytes())
                .unwrap_or_default(),
        );
        B64.encode(out)
    }

    pub fn open(&self, sealed: &str) -> Option<String> {
        let raw = B64.decode(sealed).ok()?;
        if raw.len() < 12 {
            return None;
        }
        let (nonce, ct) = raw.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().ok()?;
        let plain = self.0.decrypt(&Nonce::from(nonce), ct).ok()?;
        String::from_utf8(plain).ok()
    }
}

/// Resolves names and keeps only public addresses (unless private targets are allowed): the check happens on the
/// addresses the connection will actually use, so DNS rebinding cannot slip a private address in.
struct GuardedResolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow_private;
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|a| allow || proxyfleet_proto::net::is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(Box::new(std::io::Error::other(
                    "refused: the host resolves only to private or reserved addresses",
                ))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Sends webhook requests.
#[derive(Clone)]
pub struct Sender {
    client: reqwest::Client,
    allow_private: bool,
}

/// The result of one delivery attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub status: Option<u16>,
    pub latency_ms: i64,
    pub error: Option<String>,
    pub response_head: Option<String>,
}

impl Attempt {
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

impl Sender {
    pub fn new(allow_private: bool) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver { allow_private }))
            .redirect(reqwest::redirect::Policy::none())
            // A fresh connection per attempt: a pooled one the receiver has just closed would fail the attempt
            // (and delay the event by a retry); webhook volume is low.
            .pool_max_idle_per_host(0)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(ATTEMPT_TIMEOUT)
            .user_agent(concat!("proxyfleet-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Sender {
            client,
            allow_private,
        })
    }

    /// Why `url` may not be used (checked when it is saved and before every attempt), or `None`.
    pub fn refuse_url(&self, url: &str) -> Option<String> {
        let u = match url::Url::parse(url) {
            Ok(u) => u,
            Err(e) => return Some(format!("not a URL: {e}")),
        };
        if !matches!(u.scheme(), "http" | "https") {
            return Some("the URL must be http:// or https://".into());
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Some("the URL must not contain credentials".into());
        }
        let ip = match u.host() {
            None => return Some("the URL has no host".into()),
            Some(url::Host::Ipv4(a)) => Some(IpAddr::V4(a)),
            Some(url::Host::Ipv6(a)) => Some(IpAddr::V6(a)),
            Some(url::Host::Domain(_)) => None,
        };
        // Literal addresses never reach the resolver, so they are judged here.
        match ip {
            Some(ip) if !self.allow_private && !proxyfleet_proto::net::is_public(ip) => {
                Some(format!("refused: {ip} is a private or reserved address"))
            }
            _ => None,
        }
    }

    /// One signed POST. Never follows redirects; bounded by the attempt timeout.
    pub async fn send(
        &self,
        url: &str,
        secret: &str,
        id: &str,
        timestamp: i64,
        body: &str,
    ) -> Attempt {
        let started = Instant::now();
        let elapsed = |t: Instant| i64::try_from(t.elapsed().as_millis()).unwrap_or(i64::MAX);
        if let Some(why) = self.refuse_url(url) {
            return Attempt {
                status: None,
                latency_ms: 0,
                error: Some(why),
                response_head: None,
            };
        }
        let Some(signature) = sign(secret, id, timestamp, body.as_bytes()) else {
            return Attempt {
                status: None,
                latency_ms: 0,
                error: Some("the signing secret is unreadable".into()),
                response_head: None,
            };
        };
        let sent = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body.to_owned())
            .send()
            .await;
        match sent {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let head = read_head(resp).await;
                Attempt {
                    status: Some(status),
                    latency_ms: elapsed(started),
                    error: None,
                    response_head: Some(head),
                }
            }
            Err(e) => Attempt {
                status: None,
                latency_ms: elapsed(started),
                error: Some(describe(&e)),
                response_head: None,
            },
        }
    }
}

/// The first bytes of a response body (bounded, within the attempt's timeout).
async fn read_head(mut resp: reqwest::Response) -> String {
    let mut out = Vec::new();
    while out.len() < RESPONSE_HEAD {
        match resp.chunk().await {
            Ok(Some(c)) => out.extend_from_slice(&c[..c.len().min(RESPONSE_HEAD - out.len())]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A short, safe description of a failed request (its source chain, without the URL's query).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let mut detail = String::new();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        detail = s.to_string();
        src = s.source();
    }
    let mut msg = if detail.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {detail}")
    };
    msg.truncate(480);
    msg
}

/// When to try again after the `attempts`-th failed attempt, or `None` when the retries are used up.
pub fn next_attempt(now: i64, attempts: i64) -> Option<i64> {
    let i = usize::try_from(attempts.max(1) - 1).ok()?;
    let wait = *RETRY_SCHEDULE_SECS.get(i)? * 1000;
    let jitter = rand::random_range(-wait / 5..=wait / 5);
    Some(now + wait + jitter)
}

/// Deliver due outbox events until cancelled. `wake` makes it look at once (a new event was written).
pub async fn worker(
    store: Store,
    clock: Arc<dyn Clock>,
    key: DataKey,
    sender: Sender,
    wake: Arc<tokio::sync::Notify>,
    cancel: CancellationToken,
) {
    loop {
        let now = clock.now_ms();
        match store.due_events(now, 32).await {
            Ok(ids) => {
                // One operator's events go out in the order they happened; operators are served side by side, so
                // one slow receiver does not hold up the others.
                let mut by_operator: Vec<(String, Vec<EventRow>)> = Vec::new();
                for id in ids {
                    if let Ok(Some(ev)) = store.claim_event(&id, now, now + CLAIM_MS).await {
                        match by_operator.iter_mut().find(|(op, _)| *op == ev.operator_id) {
                            Some((_, list)) => list.push(ev),
                            None => by_operator.push((ev.operator_id.clone(), vec![ev])),
                        }
                    }
                }
                let runs = by_operator.into_iter().map(|(_, events)| {
                    let (store, clock, key, sender) =
                        (store.clone(), clock.clone(), key.clone(), sender.clone());
                    async move {
                        for ev in events {
                            deliver(&store, clock.as_ref(), &key, &sender, ev).await;
                        }
                    }
                });
                futures_util::future::join_all(runs).await;
            }
            Err(e) => tracing::warn!(error = %e, "reading the webhook outbox failed"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// One attempt for a claimed event, recorded with its consequence.
async fn deliver(store: &Store, clock: &dyn Clock, key: &DataKey, sender: &Sender, ev: EventRow) {
    let endpoint = match store.webhook_endpoint(&ev.operator_id).await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "reading a webhook endpoint failed");
            return;
        }
    };
    let now = clock.now_ms();
    let Some(endpoint) = endpoint.filter(|e| e.disabled_at.is_none()) else {
        let _ = store
            .record_attempt(
                &ev,
                now,
                None,
                0,
                Some("no enabled webhook endpoint"),
                None,
                &EventOutcome::Failed,
            )
            .await;
        return;
    };
    let Some(secret) = key.open(&endpoint.secret_enc) else {
        tracing::error!(operator = %ev.operator_id, "webhook secret cannot be decrypted (data key changed?)");
        return;
    };
    let attempt = sender
        .send(&endpoint.url, &secret, &ev.id, now / 1000, &ev.payload)
        .await;
    let after = clock.now_ms();
    let outcome = if attempt.ok() {
        EventOutcome::Delivered
    } else if attempt.status == Some(410) {
        let _ = store
            .disable_webhook_endpoint(&ev.operator_id, "the receiver answered 410 Gone", after)
            .await;
        tracing::warn!(operator = %ev.operator_id, "webhook endpoint answered 410 Gone; disabled");
        EventOutcome::Failed
    } else {
        match next_attempt(after, ev.attempts + 1) {
            Some(at) => EventOutcome::Retry(at),
            None => EventOutcome::Failed,
        }
    };
    if let Err(e) = store
        .record_attempt(
            &ev,
            now,
            attempt.status,
            attempt.latency_ms,
            attempt.error.as_deref(),
            attempt.response_head.as_deref(),
            &outcome,
        )
        .await
    {
        tracing::warn!(error = %e, event = %ev.id, "recording a webhook attempt failed");
    }
}

/// An event as every receiver gets it: `{"type", "id", "timestamp", "data"}`, with a fresh id.
pub fn event(
    operator_id: &str,
    event_type: &str,
    now_ms: i64,
    data: serde_json::Value,
) -> crate::store::NewEvent {
    let id = new_event_id();
    let payload = serde_json::json!({
        "type": event_type,
        "id": id,
        "timestamp": crate::clock::rfc3339(now_ms),
        "data": data,
    });
    crate::store::NewEvent {
        id,
        operator_id: operator_id.to_owned(),
        event_type: event_type.to_owned(),
        payload: payload.to_string(),
    }
}

/// A new event id: `msg_` and a UUIDv7 in hex, so ids sort in the order events were made.
pub fn new_event_id() -> String {
    format!("msg_{}", uuid::Uuid::now_v7().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_published_test_vector() {
        let sig = sign(
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1_649_367_553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        );
        assert_eq!(
            sig.as_deref(),
            Some("v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=")
        );
    }

    #[test]
    fn secrets_are_sealed_and_opened_only_with_the_key() {
        let k = DataKey::from_bytes(&[7; 32]);
        let s = new_secret();
        assert!(s.starts_with("whsec_"));
        let sealed = k.seal(&s);
        assert!(!sealed.contains(&s[6..]));
        assert_eq!(k.open(&sealed).as_deref(), Some(s.as_str()));
        assert_eq!(DataKey::from_bytes(&[8; 32]).open(&sealed), None);
        assert_eq!(k.open("garbage"), None);
    }

    #[test]
    fn retries_cover_about_a_day_with_jitter() {
        let total: i64 = RETRY_SCHEDULE_SECS.iter().sum();
        assert!((20 * 3600..=30 * 3600).contains(&total), "{total}");
        for (i, w) in RETRY_SCHEDULE_SECS.iter().enumerate() {
            let at = next_attempt(0, i as i64 + 1).unwrap();
            assert!((w * 800..=w * 1200).contains(&at), "attempt {i}: {at}");
        }
        assert_eq!(next_attempt(0, RETRY_SCHEDULE_SECS.len() as i64 + 1), None);
    }

    #[test]
    fn private_literal_urls_are_refused() {
        let s = Sender::new(false).unwrap();
        for u in [
            "http://127.0.0.1/x",
            "http://[::1]/",
            "http://10.0.0.1/",
            "http://169.254.169.254/latest",
            "http://[::ffff:127.0.0.1]/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://224.0.0.1/",
        ] {
            assert!(
                s.refuse_url(u).is_some_and(|m| m.contains("private")),
                "{u}"
            );
        }
        assert!(s.refuse_url("ftp://example.com/").is_some());
        assert!(s.refuse_url("https://u:p@example.com/").is_some());
        assert_eq!(s.refuse_url("https://example.com/hook"), None);
        assert_eq!(
            Sender::new(true).unwrap().refuse_url("http://127.0.0.1/x"),
            None
        );
    }
}
