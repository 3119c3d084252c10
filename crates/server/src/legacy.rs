//! Moving operators off plaintext: importing legacy connection exports, and the bcrypt migration that replaces
//! every plaintext password (`connections.password_plain`) with its hash.
//!
//! Invariants (each batch is one transaction, each update conditional on the plaintext it hashed):
//! a row always has a hash or a plaintext; the plaintext count only goes down; no row is hashed twice; a row the
//! migration cannot hash is reported and left as it was. Nothing but this module reads `password_plain`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::Deserialize;

use crate::auth::password::{HashError, Hasher, MAX_PASSWORD_BYTES};
use crate::store::{ImportCounts, LegacyConnection, Store, StoreError};

/// Rows hashed per transaction.
pub const DEFAULT_BATCH: usize = 200;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Plaintexts replaced by hashes in this run (or, in a dry run, that would be).
    pub migrated: u64,
    /// Rows that already had a hash and no plaintext when the run started.
    pub already_hashed: i64,
    /// Rows left as they were: `(username, reason)`.
    pub failed: Vec<(String, String)>,
    /// Plaintext rows at the start.
    pub plaintext_at_start: i64,
}

/// Why bcrypt cannot take a password, or `None` when it can.
fn unhashable(password: &str) -> Option<String> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Some(format!(
            "password is {} bytes; bcrypt takes at most {MAX_PASSWORD_BYTES} (regenerate this connection's password)",
            password.len()
        ));
    }
    if password.is_empty() {
        return Some("password is empty".into());
    }
    None
}

/// Hash every plaintext password, `batch` rows per transaction, all cores at once. `progress(done, total)` is
/// called after each batch. A dry run reads and reports, and writes nothing. `stop` ends the run between batches.
pub async fn migrate_passwords(
    store: &Store,
    hasher: &Hasher,
    batch: usize,
    dry_run: bool,
    stop: &tokio_util::sync::CancellationToken,
    mut progress: impl FnMut(u64, i64),
) -> Result<MigrationReport, StoreError> {
    let (plaintext, hashed, _) = store.credential_counts().await?;
    let mut report = MigrationReport {
        already_hashed: hashed,
        plaintext_at_start: plaintext,
        ..MigrationReport::default()
    };
    let mut after = String::new();
    let limit = i64::try_from(batch.max(1)).unwrap_or(200);
    while !stop.is_cancelled() {
        let rows = store.plaintext_batch(&after, limit).await?;
        let Some(last) = rows.last() else { break };
        after.clone_from(&last.0);
        let mut hashing = Vec::with_capacity(rows.len());
        for (id, username, plain) in rows {
            if let Some(why) = unhashable(&plain) {
                report.failed.push((username, why));
                continue;
            }
            if dry_run {
                report.migrated += 1;
                continue;
            }
            let h = hasher.clone();
            hashing.push(async move {
                let r = h.hash(&plain).await;
                (id, username, plain, r)
            });
        }
        let mut ok = Vec::with_capacity(hashing.len());
        for (id, username, plain, r) in futures_util::future::join_all(hashing).await {
            match r {
                Ok(hash) => ok.push((id, hash, plain)),
                Err(e @ (HashError::TooLong | HashError::Bcrypt(_))) => {
                    report.failed.push((username, e.to_string()));
                }
                Err(e) => {
                    report
                        .failed
                        .push((username, format!("not hashed this run: {e}")));
                }
            }
        }
        if !ok.is_empty() {
            report.migrated += store.store_hashes(&ok).await?;
        }
        progress(report.migrated + report.failed.len() as u64, plaintext);
    }
    Ok(report)
}

/// Migrate one row now (a customer is authenticating with a connection the batch has not reached). True when the
/// row has a hash afterwards.
pub async fn migrate_one(store: &Store, hasher: &Hasher, id: &str) -> Result<bool, StoreError> {
    let Some(plain) = store.plaintext_of(id).await? else {
        return Ok(false);
    };
    if unhashable(&plain).is_some() {
        return Ok(false);
    }
    let Ok(hash) = hasher.hash(&plain).await else {
        return Ok(false);
    };
    // Zero rows changed means the batch migrated it meanwhile: it has a hash either way.
    store
        .store_hashes(&[(id.to_owned(), hash, plain)])
        .await
        .map(|_| true)
}

/// One row of a legacy export, as written (every field a string or a number, most optional).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRow {
    name: Option<String>,
    device: Option<String>,
    username: Option<String>,
    password: Option<String>,
    bandwidth_limit_bytes: Option<serde_json::Value>,
    used_bytes: Option<serde_json::Value>,
    enabled: Option<serde_json::Value>,
}

/// A row that cannot be imported: where it is and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// Line number in a CSV file (the header is line 1), entry number (from 1) in a JSON array.
    pub line: usize,
    pub reason: String,
}

impl std::fmt::Display for BadRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {0}")]
    Read(String, #[source] std::io::Error),
    #[error("{0}")]
    Format(String),
    #[error("no operator named {0:?}")]
    NoOperator(String),
    #[error("{} bad row(s); nothing was imported (use --skip-bad to import the rest)", .0.len())]
    BadRows(Vec<BadRow>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Default)]
pub struct ImportReport {
    pub counts: ImportCounts,
    /// Rows skipped with `--skip-bad`.
    pub skipped: Vec<BadRow>,
}

/// Longest plaintext accepted from an export (the migration reports those bcrypt cannot take).
const MAX_IMPORT_PASSWORD: usize = 1024;

fn number(v: Option<serde_json::Value>, what: &str) -> Result<Option<i64>, String> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(serde_json::Value::String(s)) => s
            .trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|_| format!("{what} {s:?} is not a whole number")),
        Some(serde_json::Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| format!("{what} {n} is not a whole number")),
        Some(other) => Err(format!("{what} {other} is not a number")),
    }
}

fn boolean(v: Option<serde_json::Value>) -> Result<bool, String> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(true),
        Some(serde_json::Value::Bool(b)) => Ok(b),
        Some(serde_json::Value::Number(n)) if n.as_i64() == Some(1) => Ok(true),
        Some(serde_json::Value::Number(n)) if n.as_i64() == Some(0) => Ok(false),
        Some(serde_json::Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "" | "1" | "true" | "yes" | "y" | "on" | "enabled" | "active" => Ok(true),
            "0" | "false" | "no" | "n" | "off" | "disabled" | "inactive" => Ok(false),
            _ => Err(format!("enabled {s:?} is not true or false")),
        },
        Some(other) => Err(format!("enabled {other} is not true or false")),
    }
}

/// Usernames the doors (and OpenVPN) take unchanged.
fn valid_username(u: &str) -> bool {
    (1..=64).contains(&u.len())
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

/// Read an export: CSV (header `name,device,username,password,bandwidth_limit_bytes,used_bytes,enabled`) or a JSON
/// array of objects with the same keys. Returns each row with its line (CSV) or entry number (JSON).
/// A row of the file with its line, or why it could not be read.
type NumberedRow = (usize, Result<RawRow, String>);

fn read_rows(path: &Path) -> Result<Vec<NumberedRow>, ImportError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ImportError::Read(path.display().to_string(), e))?;
    let json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        || text.trim_start().starts_with('[');
    if json {
        let values: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| {
            ImportError::Format(format!(
                "{}: not a JSON array of objects: {e}",
                path.display()
            ))
        })?;
        return Ok(values
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                (
                    i + 1,
                    serde_json::from_value::<RawRow>(v).map_err(|e| e.to_string()),
                )
            })
            .collect());
    }
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::Headers)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| ImportError::Format(format!("{}: {e}", path.display())))?
        .clone();
    let mut out = Vec::new();
    for rec in reader.records() {
        match rec {
            Ok(r) => {
                let line = r.position().map_or(0, |p| p.line() as usize);
                let mut obj = serde_json::Map::new();
                for (h, v) in headers.iter().zip(r.iter()) {
                    obj.insert(h.to_owned(), serde_json::Value::String(v.to_owned()));
                }
                let row = serde_json::from_value::<RawRow>(serde_json::Value::Object(obj))
                    .map_err(|e| e.to_string());
                out.push((line, row));
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line() as usize);
                out.push((line, Err(format!("unreadable CSV record: {e}"))));
            }
        }
    }
    Ok(out)
}

/// Import an export for the operator named `operator`. All or nothing unless `skip_bad`.
pub async fn import_connections(
    store: &Store,
    operator: &str,
    path: &Path,
    skip_bad: bool,
    now: i64,
) -> Result<ImportReport, ImportError> {
    let op = store
        .operator_by_username(&operator.to_lowercase())
        .await?
        .ok_or_else(|| ImportError::NoOperator(operator.to_owned()))?;
    let devices = store.devices(&op.id).await?;
    let by_id: HashSet<&str> = devices.iter().map(|d| d.id.as_str()).collect();
    let mut by_name: HashMap<&str, Vec<&str>> = HashMap::new();
    for d in &devices {
        by_name
            .entry(d.name.as_str())
            .or_default()
            .push(d.id.as_str());
    }
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let mut seen = HashSet::new();
    for (line, row) in read_rows(path)? {
        let checked = row.and_then(|r| {
            let username = r.username.map(|u| u.trim().to_owned()).unwrap_or_default();
            if !valid_username(&username) {
                return Err(format!(
                    "username {username:?} must be 1–64 letters, digits or . _ - @"
                ));
            }
            if !seen.insert(username.clone()) {
                return Err(format!("username {username:?} appears twice in the file"));
            }
            let password = r.password.unwrap_or_default();
            if password.is_empty() || password.len() > MAX_IMPORT_PASSWORD {
                return Err(format!("password must be 1–{MAX_IMPORT_PASSWORD} bytes"));
            }
            let name = r
                .name
                .map(|n| n.trim().to_owned())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| username.clone());
            if name.chars().count() > 100 {
                return Err("name must be at most 100 characters".into());
            }
            let device_id = match r.device.as_deref().map(str::trim).filter(|d| !d.is_empty()) {
                None => None,
                Some(d) if by_id.contains(d) => Some(d.to_owned()),
                Some(d) => match by_name.get(d).map(Vec::as_slice) {
                    Some([one]) => Some((*one).to_owned()),
                    Some(_) => {
                        return Err(format!("device name {d:?} is ambiguous: use the device id"))
                    }
                    None => {
                        return Err(format!("no device {d:?} (by id or name) for this operator"))
                    }
                },
            };
            let limit_bytes = number(r.bandwidth_limit_bytes, "bandwidth_limit_bytes")?;
            if limit_bytes.is_some_and(|l| l < 1) {
                return Err(
                    "bandwidth_limit_bytes must be at least 1 (leave it empty for unlimited)"
                        .into(),
                );
            }
            let used_bytes = number(r.used_bytes, "used_bytes")?.unwrap_or(0);
            if used_bytes < 0 {
                return Err("used_bytes must not be negative".into());
            }
            Ok(LegacyConnection {
                name,
                device_id,
                username,
                password,
                limit_bytes,
                used_bytes,
                enabled: boolean(r.enabled)?,
            })
        });
        match checked {
            Ok(c) => good.push((line, c)),
            Err(reason) => bad.push(BadRow { line, reason }),
        }
    }
    // Usernames are global (the shared proxy ports pick the connection by username).
    let names: Vec<String> = good.iter().map(|(_, c)| c.username.clone()).collect();
    let taken: HashMap<String, String> = store.username_owners(&names).await?.into_iter().collect();
    good.retain(|(line, c)| match taken.get(&c.username) {
        Some(owner) if *owner != op.id => {
            bad.push(BadRow {
                line: *line,
                reason: format!("username {:?} belongs to another operator", c.username),
            });
            false
        }
        _ => true,
    });
    bad.sort_by_key(|b| b.line);
    if !bad.is_empty() && !skip_bad {
        return Err(ImportError::BadRows(bad));
    }
    let rows: Vec<LegacyConnection> = good.into_iter().map(|(_, c)| c).collect();
    let counts = store.import_legacy(&op.id, &rows, now).await?;
    Ok(ImportReport {
        counts,
        skipped: bad,
    })
}
