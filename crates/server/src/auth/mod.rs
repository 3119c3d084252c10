//! Operator authentication: passwords, tokens, sessions and brute-force limits.

pub mod jwt;
pub mod limiter;
pub mod password;
pub mod sessions;

use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;
use crate::store::{NewOperator, Operator, Role, Store, StoreError};
use limiter::{LimitKeys, LoginLimiter};
use password::{HashError, Hasher, PolicyError};
use sessions::{Issued, SessionError, Sessions};

/// Why a login failed. Only the log and metrics see the difference; the client sees one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginFailure {
    UnknownUser,
    BadPassword,
    Disabled,
    LockedOut,
}

impl LoginFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            LoginFailure::UnknownUser => "unknown_user",
            LoginFailure::BadPassword => "bad_password",
            LoginFailure::Disabled => "disabled",
            LoginFailure::LockedOut => "locked_out",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid username or password")]
    Login(LoginFailure, Option<Duration>),
    #[error("{0}")]
    Policy(#[from] PolicyError),
    #[error("{0}")]
    Username(&'static str),
    #[error("current password is incorrect")]
    WrongCurrentPassword,
    #[error("new password must differ from the current one")]
    SamePassword,
    #[error("too many attempts")]
    Locked(Duration),
    #[error("no such operator")]
    NoOperator,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error(transparent)]
    Session(#[from] SessionError),
}

#[derive(Clone)]
pub struct Auth {
    pub store: Store,
    pub hasher: Hasher,
    pub sessions: Sessions,
    pub limiter: LoginLimiter,
    pub clock: Arc<dyn Clock>,
    pub composition_rule: bool,
}

impl Auth {
    /// Verify a username and password and start a session. Locked-out keys are refused before any hashing;
    /// unknown usernames cost one dummy verification so that they take as long as a wrong password.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        ip: &str,
        user_agent: &str,
    ) -> Result<Issued, AuthError> {
        let keys = LimitKeys::new(username, ip);
        let attempt = match self.limiter.begin(&keys).await {
            Ok(a) => a,
            Err(retry) => return Err(AuthError::Login(LoginFailure::LockedOut, Some(retry))),
        };
        let judged = self.judge(username, password).await;
        match judged {
            Err(e) => {
                self.limiter.release(&keys, attempt).await;
                Err(e)
            }
            Ok(Ok(op)) => {
                self.limiter.succeeded(&keys, attempt).await;
                let issued = self.sessions.create(&op, ip, user_agent).await?;
                // A password change or disable that ran while this login was hashing revoked the sessions it saw,
                // not this one; check again now that the session exists.
                match self.store.operator_by_id(&op.id).await? {
                    Some(now)
                        if now.password_changed_at == op.password_changed_at
                            && now.disabled_at.is_none() =>
                    {
                        Ok(issued)
                    }
                    _ => {
                        self.sessions
                            .revoke(&op.id, &issued.session.id, "superseded")
                            .await?;
                        Err(AuthError::Login(LoginFailure::BadPassword, None))
                    }
                }
            }
            Ok(Err(failure)) => {
                self.limiter.failed(&keys, attempt).await;
                Err(AuthError::Login(failure, None))
            }
        }
    }

    /// The operator these credentials prove, or why they prove nothing.
    async fn judge(
        &self,
        username: &str,
        password: &str,
    ) -> Result<Result<Operator, LoginFailure>, AuthError> {
        let op = match password::normalize_username(username) {
            Ok(name) => self.store.operator_by_username(&name).await?,
            Err(_) => None,
        };
        let Some(op) = op else {
            self.hasher.verify_dummy().await;
            return Ok(Err(LoginFailure::UnknownUser));
        };
        let ok = self.hasher.verify(password, &op.password_hash).await?;
        Ok(match (ok, op.disabled_at) {
            (false, _) => Err(LoginFailure::BadPassword),
            (true, Some(_)) => Err(LoginFailure::Disabled),
            (true, None) => Ok(op),
        })
    }

    /// Change the caller's password: needs the current one, refuses the same one, ends every session of the
    /// operator (this one too) and returns a fresh token for the caller.
    pub async fn change_password(
        &self,
        operator_id: &str,
        current: &str,
        new: &str,
        ip: &str,
        user_agent: &str,
    ) -> Result<Issued, AuthError> {
        let op = self
            .store
            .operator_by_id(operator_id)
            .await?
            .ok_or(AuthError::NoOperator)?;
        let keys = LimitKeys::new(&op.username, ip);
        let attempt = self.limiter.begin(&keys).await.map_err(AuthError::Locked)?;
        match self.hasher.verify(current, &op.password_hash).await {
            Err(e) => {
                self.limiter.release(&keys, attempt).await;
                return Err(e.into());
            }
            Ok(false) => {
                self.limiter.failed(&keys, attempt).await;
                return Err(AuthError::WrongCurrentPassword);
            }
            Ok(true) => self.limiter.succeeded(&keys, attempt).await,
        }
        if current == new {
            return Err(AuthError::SamePassword);
        }
        password::check_password(&op.username, new, self.composition_rule)?;
        let hash = self.hasher.hash(new).await?;
        self.store
            .set_operator_password(&op.id, &hash, self.clock.now_ms())
            .await?;
        self.sessions
            .revoke_all(&op.id, None, "password_changed")
            .await?;
        Ok(self.sessions.create(&op, ip, user_agent).await?)
    }

    /// Check a new operator's username and password and hash the password.
    pub async fn prepare_operator(
        &self,
        username: &str,
        password: &str,
    ) -> Result<(String, String), AuthError> {
        let name = password::normalize_username(username).map_err(AuthError::Username)?;
        password::check_password(&name, password, self.composition_rule)?;
        let hash = self.hasher.hash(password).await?;
        Ok((name, hash))
    }

    pub async fn create_operator(
        &self,
        username: &str,
        password: &str,
        role: Role,
    ) -> Result<Operator, AuthError> {
        let (name, hash) = self.prepare_operator(username, password).await?;
        Ok(self
            .store
            .create_operator(NewOperator {
                username: &name,
                password_hash: &hash,
                role,
                now: self.clock.now_ms(),
            })
            .await?)
    }
}

/// How long a first-run setup token stays valid, in milliseconds.
pub const SETUP_TOKEN_TTL_MS: i64 = 24 * 3600 * 1000;

/// A new random setup token (256 bits, URL-safe) and the hash under which the store keeps it.
pub fn new_setup_token() -> (String, String) {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let hash = setup_token_hash(&token);
    (token, hash)
}

/// SHA-256 of a setup token, hex. The token is random and high-entropy, so a fast hash is enough.
pub fn setup_token_hash(token: &str) -> String {
    use sha2::Digest;
    crate::pki::hex(&sha2::Sha256::digest(token.as_bytes()))
}

/// If no operator exists, store a fresh setup token and return it (to be shown once to whoever started the
/// server). Any older token stops working.
pub async fn issue_setup_token_if_needed(
    store: &Store,
    clock: &dyn Clock,
) -> Result<Option<String>, StoreError> {
    if store.count_operators().await? > 0 {
        return Ok(None);
    }
    let (token, hash) = new_setup_token();
    let now = clock.now_ms();
    store
        .put_setup_token(&hash, now, now + SETUP_TOKEN_TTL_MS)
        .await?;
    Ok(Some(token))
}
