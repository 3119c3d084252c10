//! Operator password policy and bcrypt hashing off the async runtime.

use std::sync::Arc;

use tokio::sync::Semaphore;

/// bcrypt work factor. Exactly 12, by decision of the brief (about 0.2–0.3 s of CPU per hash here).
pub const BCRYPT_COST: u32 = 12;
/// bcrypt reads 72 bytes including the terminating NUL, so 71 of password; longer passwords are refused rather than
/// silently truncated (the bcrypt crate refuses 72 itself, which was a 500 before session 7).
pub const MAX_PASSWORD_BYTES: usize = 71;
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest wait for a hashing slot before giving up with "busy".
pub const HASH_QUEUE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Which rule a password broke. The message is safe to show to the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("password must be at least {MIN_PASSWORD_CHARS} characters")]
    TooShort,
    #[error("password must be at most {MAX_PASSWORD_BYTES} bytes")]
    TooLong,
    #[error("password must contain an uppercase letter")]
    NoUppercase,
    #[error("password must contain a lowercase letter")]
    NoLowercase,
    #[error("password must contain a digit")]
    NoDigit,
    #[error("password must contain a special character")]
    NoSpecial,
    #[error("password is too common; choose one that is not on lists of common passwords")]
    Common,
    #[error("password must not contain the username")]
    ContainsUsername,
}

/// Check a new password. `composition` switches the upper/lower/digit/special rule (NIST 800-63B deployments turn
/// it off); length, the block list and the username check always apply.
pub fn check_password(
    username: &str,
    password: &str,
    composition: bool,
) -> Result<(), PolicyError> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(PolicyError::TooLong);
    }
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(PolicyError::TooShort);
    }
    if composition {
        if !password.chars().any(char::is_uppercase) {
            return Err(PolicyError::NoUppercase);
        }
        if !password.chars().any(char::is_lowercase) {
            return Err(PolicyError::NoLowercase);
        }
        if !password.chars().any(|c| c.is_ascii_digit()) {
            return Err(PolicyError::NoDigit);
        }
        if !password.chars().any(|c| !c.is_alphanumeric()) {
            return Err(PolicyError::NoSpecial);
        }
    }
    let lower = password.to_lowercase();
    if !username.is_empty() && lower.contains(&username.to_lowercase()) {
        return Err(PolicyError::ContainsUsername);
    }
    if is_common(&lower) {
        return Err(PolicyError::Common);
    }
    Ok(())
}

/// Common passwords (lowercase) and the common words behind the "Word + digits + symbol" pattern that a
/// composition rule lets through (`Password1!`, `P@ssw0rd1`, `Welcome1!`).
const BLOCKLIST: &str = include_str!("common_passwords.txt");

fn is_common(lower: &str) -> bool {
    let not_letter = |c: char| !c.is_alphabetic();
    let core = unleet(lower.trim_matches(not_letter));
    let core = core.trim_matches(not_letter);
    BLOCKLIST
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .any(|word| word == lower || word == core)
}

/// Undo the usual letter-for-symbol swaps so that `p@$$w0rd` compares equal to `password`.
fn unleet(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '@' | '4' => 'a',
            '0' => 'o',
            '1' | '!' | '|' => 'i',
            '3' => 'e',
            '$' | '5' => 's',
            '7' => 't',
            _ => c,
        })
        .collect()
}

/// Rule for operator usernames: 3–64 characters, ASCII letters, digits and underscore. Usernames are
/// case-insensitive and stored lowercase.
pub fn normalize_username(raw: &str) -> Result<String, &'static str> {
    let len = raw.chars().count();
    if len < 3 {
        return Err("username must be at least 3 characters");
    }
    if len > 64 {
        return Err("username must be at most 64 characters");
    }
    if !raw.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err("username may contain only letters, digits and underscore");
    }
    Ok(raw.to_ascii_lowercase())
}

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("password must be at most {MAX_PASSWORD_BYTES} bytes")]
    TooLong,
    #[error("bcrypt failed")]
    Bcrypt(#[source] bcrypt::BcryptError),
    #[error("too many password checks queued")]
    Busy,
    #[error("hasher is shut down")]
    Closed,
    #[error("hashing task failed")]
    Join(#[source] tokio::task::JoinError),
}

/// Runs bcrypt on the blocking pool, at most `permits` at a time, so that a login storm cannot starve the
/// runtime or queue unbounded CPU work.
#[derive(Clone)]
pub struct Hasher {
    permits: Arc<Semaphore>,
    /// How many permits each lane has ([`Hasher::own_lane`]).
    lane_size: usize,
    dummy_hash: Arc<str>,
    cost: u32,
    /// bcrypt computations run, by this hasher and its clones.
    runs: Arc<std::sync::atomic::AtomicU64>,
    /// How long making the dummy hash took at start: about one verification's time.
    typical: std::time::Duration,
}

impl Hasher {
    /// `dummy_hash` is verified against for unknown usernames so that they cost the same as wrong passwords.
    pub async fn new(permits: usize) -> Result<Self, HashError> {
        Self::with_cost(permits, BCRYPT_COST).await
    }

    /// A hasher making hashes of another cost. Only tests and benchmarks use anything but [`BCRYPT_COST`]
    /// (verification reads the cost from the hash, so it is unaffected).
    pub async fn with_cost(permits: usize, cost: u32) -> Result<Self, HashError> {
        let lane_size = permits.max(1);
        let permits = Arc::new(Semaphore::new(lane_size));
        let seed: [u8; 16] = rand::random();
        let started = std::time::Instant::now();
        let dummy = tokio::task::spawn_blocking(move || bcrypt::non_truncating_hash(seed, cost))
            .await
            .map_err(HashError::Join)?
            .map_err(HashError::Bcrypt)?;
        let typical = started.elapsed();
        Ok(Hasher {
            permits,
            lane_size,
            dummy_hash: dummy.into(),
            cost,
            runs: Arc::default(),
            typical,
        })
    }

    /// A hasher with its own queue and as many permits, sharing everything else: checks queued on one never wait
    /// behind the other's. Customers' proxy checks run on their own lane, so that hundreds of first uses at once
    /// (a deploy, a customer's backend starting) do not hold an operator's login for as long as they take; when
    /// both are busy, the cores are shared between them.
    pub fn own_lane(&self) -> Hasher {
        Hasher {
            permits: Arc::new(Semaphore::new(self.lane_size)),
            ..self.clone()
        }
    }

    pub async fn hash(&self, password: &str) -> Result<String, HashError> {
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(HashError::TooLong);
        }
        let password = password.to_owned();
        let cost = self.cost;
        self.run(move || bcrypt::non_truncating_hash(password, cost))
            .await
    }

    /// True when `password` matches `hash`. A password over [`MAX_PASSWORD_BYTES`] never matches.
    pub async fn verify(&self, password: &str, hash: &str) -> Result<bool, HashError> {
        if password.len() > MAX_PASSWORD_BYTES {
            // Still spend the time, so the length of a guess reveals nothing.
            self.verify_dummy().await;
            return Ok(false);
        }
        let (password, hash) = (password.to_owned(), hash.to_owned());
        match self
            .run(move || bcrypt::non_truncating_verify(password, &hash))
            .await
        {
            Ok(ok) => Ok(ok),
            Err(HashError::Bcrypt(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Spend one verification's worth of time on nothing.
    pub async fn verify_dummy(&self) {
        let hash = self.dummy_hash.to_string();
        let _ = self
            .run(move || bcrypt::non_truncating_verify("not-a-password", &hash))
            .await;
    }

    /// Wait about as long as one verification takes, without computing anything: an answer that must not come
    /// sooner than a wrong password's, where a bcrypt would cost too much (made-up proxy usernames).
    pub async fn pause_like_verify(&self) {
        tokio::time::sleep(self.typical).await;
    }

    /// How many bcrypt computations this hasher and its clones have run.
    pub fn runs(&self) -> u64 {
        self.runs.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, bcrypt::BcryptError> + Send + 'static,
    ) -> Result<T, HashError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| HashError::Closed)?;
        self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::task::spawn_blocking(f)
            .await
            .map_err(HashError::Join)?
            .map_err(HashError::Bcrypt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A check on one lane does not queue behind the other's: with one permit each and eight checks waiting on
    /// the customers' lane, an operator's check does not wait for them (on one lane it would end after all).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_operator_check_does_not_wait_behind_the_customers_lane() {
        let operators = Hasher::with_cost(1, 10).await.unwrap();
        let customers = operators.own_lane();
        let hash: Arc<str> = operators.hash("pw").await.unwrap().into();
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut queued = Vec::new();
        for _ in 0..8 {
            let (customers, hash, done) = (customers.clone(), hash.clone(), done.clone());
            queued.push(tokio::spawn(async move {
                assert!(customers.verify("pw", &hash).await.unwrap());
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }));
        }
        // The first customer check runs, and the others have had time to queue behind it.
        while operators.runs() < 2 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(operators.verify("pw", &hash).await.unwrap());
        let before = done.load(std::sync::atomic::Ordering::SeqCst);
        for q in queued {
            q.await.unwrap();
        }
        // On one lane it ends after all eight; the margin is for a loaded machine.
        assert!(
            before < 8,
            "{before} of 8 customer checks ran before the operator's"
        );
        assert_eq!(operators.runs(), 1 + 1 + 8, "runs are counted across lanes");
    }

    #[test]
    fn each_rule_says_what_failed() {
        let table = [
            ("Sh0rt!", Err(PolicyError::TooShort)),
            (&"Aa1!".repeat(19)[..], Err(PolicyError::TooLong)),
            ("lowercase1!", Err(PolicyError::NoUppercase)),
            ("UPPERCASE1!", Err(PolicyError::NoLowercase)),
            ("NoDigitsHere!", Err(PolicyError::NoDigit)),
            ("NoSpecial123", Err(PolicyError::NoSpecial)),
            ("Password1!", Err(PolicyError::Common)),
            ("P@ssw0rd1", Err(PolicyError::Common)),
            ("Welcome1!", Err(PolicyError::Common)),
            ("1Password!", Err(PolicyError::Common)),
            ("!Password1", Err(PolicyError::Common)),
            ("@Welcome1", Err(PolicyError::Common)),
            ("2024Welcome!", Err(PolicyError::Common)),
            ("Qwerty123!", Err(PolicyError::Common)),
            ("Xalice_ops9!", Err(PolicyError::ContainsUsername)),
            ("Tr4vel-Kettle-Moss", Ok(())),
        ];
        for (pw, want) in table {
            assert_eq!(check_password("alice_ops", pw, true), want, "{pw}");
        }
    }

    #[test]
    fn seventy_one_bytes_is_the_limit_counted_in_bytes() {
        let ok = format!("Aa1!{}", "x".repeat(67));
        assert_eq!(ok.len(), 71);
        assert_eq!(check_password("bob", &ok, true), Ok(()));
        let over = format!("Aa1!{}", "x".repeat(68));
        assert_eq!(
            check_password("bob", &over, true),
            Err(PolicyError::TooLong)
        );
        // 69 ASCII bytes plus one two-byte character: 71 chars would pass a char count, 72 bytes must not.
        let multibyte = format!("Aa1!{}é", "x".repeat(66));
        assert_eq!(multibyte.len(), 72);
        assert_eq!(
            check_password("bob", &multibyte, true),
            Err(PolicyError::TooLong)
        );
    }

    /// The longest password the rules allow is one bcrypt takes: the limit is bcrypt's, not a guess at it.
    #[test]
    fn the_longest_allowed_password_hashes_and_verifies() {
        let longest = "x".repeat(MAX_PASSWORD_BYTES);
        let hash = bcrypt::non_truncating_hash(&longest, 4)
            .expect("bcrypt takes the longest allowed password");
        assert_eq!(
            bcrypt::non_truncating_verify(&longest, &hash).ok(),
            Some(true)
        );
        assert!(bcrypt::non_truncating_hash("x".repeat(MAX_PASSWORD_BYTES + 1), 4).is_err());
    }

    #[test]
    fn composition_rule_can_be_switched_off_but_blocklist_stays() {
        assert_eq!(
            check_password("bob", "correct horse battery", false),
            Ok(())
        );
        assert_eq!(
            check_password("bob", "password", false),
            Err(PolicyError::Common)
        );
        assert_eq!(
            check_password("bob", "short", false),
            Err(PolicyError::TooShort)
        );
    }

    #[test]
    fn usernames() {
        assert_eq!(normalize_username("Alice_01"), Ok("alice_01".to_owned()));
        assert!(normalize_username("al").is_err());
        assert!(normalize_username("al ice").is_err());
        assert!(normalize_username("alice-x").is_err());
        assert!(normalize_username("ålice").is_err());
    }

    #[tokio::test]
    async fn hash_is_cost_12_and_verifies() {
        let h = Hasher::new(2).await.unwrap();
        let hash = h.hash("Tr4vel-Kettle-Moss").await.unwrap();
        assert!(hash.starts_with("$2b$12$"), "{hash}");
        assert!(h.verify("Tr4vel-Kettle-Moss", &hash).await.unwrap());
        assert!(!h.verify("Tr4vel-Kettle-Mosz", &hash).await.unwrap());
        assert!(matches!(
            h.hash(&"a".repeat(73)).await,
            Err(HashError::TooLong)
        ));
        assert!(!h.verify(&"a".repeat(73), &hash).await.unwrap());
    }
}
