//! The verified-credential cache kept across restarts, in a file of the data directory.
//!
//! Without it every connection's first flow after a restart costs a bcrypt check (about 0.25 s of CPU), and a
//! fleet of customers coming back at once queues for minutes: session 12's operator review had 127 of 200
//! returning customers get `503 authentication is busy`. Each line holds a connection's id, a SHA-256 of the
//! bcrypt hash the password was verified against, and the keyed digest of the password (never the password): a
//! line counts only while the connection still has that hash. The digests' key is derived from the tunnel key
//! (`Pki::derived_secret`), so it is the same after a restart. Written whole to a temporary file (mode 0600) and
//! renamed over the old one, so a crash leaves the previous file or the new one, never half of one.

use std::path::Path;

/// The file's first line: its format.
const HEADER: &str = "proxyfleet verified credentials v1";
/// A file larger than this is not read (about 1 million lines).
const MAX_FILE: u64 = 160 * 1024 * 1024;

/// One verified credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub connection_id: String,
    /// SHA-256 of the bcrypt hash string the password was verified against.
    pub hash_fingerprint: [u8; 32],
    /// The directory's keyed digest of the password.
    pub digest: [u8; 32],
}

/// SHA-256 of a bcrypt hash string: what ties a record to the password it was made for.
pub fn fingerprint(password_hash: &str) -> [u8; 32] {
    crate::pki::fingerprint(password_hash.as_bytes())
}

/// Replace the file at `path` with `records`.
pub fn save(path: &Path, records: &[Record]) -> std::io::Result<()> {
    let mut text = String::with_capacity(HEADER.len() + 1 + records.len() * 160);
    text.push_str(HEADER);
    text.push('\n');
    for r in records {
        text.push_str(&r.connection_id);
        text.push(' ');
        text.push_str(&crate::pki::hex(&r.hash_fingerprint));
        text.push(' ');
        text.push_str(&crate::pki::hex(&r.digest));
        text.push('\n');
    }
    proxyfleet_proto::file::write_private(path, text.as_bytes())
}

/// The records in the file at `path`: none when there is no file. Lines that are not a record are skipped (and
/// counted in the log), as is a file of another format or too large.
pub fn load(path: &Path) -> Vec<Record> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_FILE => {
            tracing::warn!(path = %path.display(), bytes = m.len(), "verified-credential file too large; ignored");
            return Vec::new();
        }
        Ok(_) => {}
        Err(_) => return Vec::new(),
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not read the verified-credential file; ignored");
            return Vec::new();
        }
    };
    parse(&text).unwrap_or_else(|| {
        tracing::warn!(path = %path.display(), "verified-credential file of an unknown format; ignored");
        Vec::new()
    })
}

/// The records of a file's text; `None` when it is not of this format.
fn parse(text: &str) -> Option<Vec<Record>> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return None;
    }
    let mut skipped = 0usize;
    let records: Vec<Record> = lines
        .filter_map(|line| {
            let r = record(line);
            skipped += usize::from(r.is_none());
            r
        })
        .collect();
    if skipped > 0 {
        tracing::warn!(
            skipped,
            "lines of the verified-credential file were not records"
        );
    }
    Some(records)
}

fn record(line: &str) -> Option<Record> {
    let mut parts = line.split(' ');
    let (id, fp, digest) = (parts.next()?, parts.next()?, parts.next()?);
    if id.is_empty() || parts.next().is_some() {
        return None;
    }
    let decode = |s: &str| -> Option<[u8; 32]> { crate::pki::unhex(s)?.try_into().ok() };
    Some(Record {
        connection_id: id.to_owned(),
        hash_fingerprint: decode(fp)?,
        digest: decode(digest)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_save_and_damage_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("verified");
        assert_eq!(load(&path), Vec::new(), "no file: nothing");
        let records = vec![
            Record {
                connection_id: "c1".into(),
                hash_fingerprint: fingerprint("$2b$12$abc"),
                digest: [7; 32],
            },
            Record {
                connection_id: "c2".into(),
                hash_fingerprint: [1; 32],
                digest: [2; 32],
            },
        ];
        save(&path, &records).unwrap();
        assert_eq!(load(&path), records);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Damaged lines are skipped, the rest kept; another format is ignored whole.
        let text = std::fs::read_to_string(&path).unwrap();
        let damaged = format!(
            "{text}c3 zz 00\nc4\n\n{} {}\n",
            "ab".repeat(32),
            "cd".repeat(32)
        );
        assert_eq!(parse(&damaged), Some(records));
        assert_eq!(parse("something else\nc1 00 00\n"), None);
        assert_eq!(parse(""), None);
    }
}
