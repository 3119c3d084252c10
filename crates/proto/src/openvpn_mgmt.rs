//! OpenVPN's management interface, as proxyfleet speaks it with `management-client-auth`: a line parser that turns
//! what the `openvpn` child writes into [`Event`]s, and the commands proxyfleet sends back.
//!
//! The interface is line-oriented. Real-time notifications start with `>`; a client notification (`CONNECT`,
//! `REAUTH`, `ESTABLISHED`, `DISCONNECT`) is a header line followed by `>CLIENT:ENV,name=value` lines and ends with
//! `>CLIENT:ENV,END`. Command replies (`SUCCESS: …`, `ERROR: …`, or multi-line output ending with `END`) may arrive
//! between any two lines of a block. Memory is bounded: a line is at most [`MAX_LINE`] bytes (the reader enforces
//! it) and a block at most [`MAX_ENV`] variables; a block that breaks a rule is dropped with an error and the
//! parser carries on with the next line.

use std::fmt;

/// Longest line accepted from the management socket, in bytes.
pub const MAX_LINE: usize = 8 * 1024;
/// Most `ENV` lines in one client block (OpenVPN sends a few dozen).
pub const MAX_ENV: usize = 256;

/// The environment OpenVPN attaches to a client notification. `password` never prints in `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Env(Vec<(String, String)>);

impl Env {
    /// The value of `name`, if OpenVPN sent it.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (k, v) in &self.0 {
            if k.contains("password") {
                m.entry(k, &"<redacted>");
            } else {
                m.entry(k, v);
            }
        }
        m.finish()
    }
}

/// Which client notification a block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// A new client wants to authenticate; answer with `client-auth` or `client-deny`.
    Connect,
    /// A connected client renegotiated and must authenticate again.
    Reauth,
    /// The client's session is up.
    Established,
    /// The client's session ended.
    Disconnect,
}

/// One thing the management interface said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete client block. `kid` is present for `Connect` and `Reauth`.
    Client {
        kind: ClientKind,
        cid: u64,
        kid: Option<u64>,
        env: Env,
    },
    /// `>CLIENT:ADDRESS,{CID},{ADDR},{PRI}`.
    Address { cid: u64, addr: String },
    /// `>HOLD:…`: OpenVPN waits for `hold release`.
    Hold,
    /// `>INFO:…` (the greeting, among others).
    Info(String),
    /// Any other real-time notification (`>LOG`, `>BYTECOUNT_CLI`, `>STATE`, …): name and text.
    Notification { name: String, text: String },
    /// `SUCCESS: …`.
    Success(String),
    /// `ERROR: …`.
    Error(String),
    /// One line of a multi-line command answer (for example `status 3`).
    Data(String),
    /// `END`: the end of a multi-line command answer.
    End,
}

/// Why a line was not understood. The parser has already recovered: feed it the next line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MgmtError {
    #[error("line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("malformed client notification: {0}")]
    BadClientLine(&'static str),
    #[error("client block with more than {MAX_ENV} variables; dropped")]
    TooManyEnv,
    #[error("ENV line outside a client block")]
    StrayEnv,
    #[error(
        "client notification started before the previous one ended; the unfinished one was dropped"
    )]
    Unterminated,
}

#[derive(Debug)]
struct Pending {
    kind: ClientKind,
    cid: u64,
    kid: Option<u64>,
    env: Vec<(String, String)>,
}

/// Turns lines into events, keeping the unfinished client block between calls.
#[derive(Debug, Default)]
pub struct Parser {
    pending: Option<Pending>,
    /// The current block overflowed: swallow its lines until its `END`.
    skipping: bool,
}

fn number(s: &str, what: &'static str) -> Result<u64, MgmtError> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(MgmtError::BadClientLine(what));
    }
    s.parse().map_err(|_| MgmtError::BadClientLine(what))
}

impl Parser {
    pub fn new() -> Self {
        Parser::default()
    }

    /// Parse one line (without its line ending). `Ok(None)` means the line was part of a block still open.
    pub fn feed(&mut self, line: &str) -> Result<Option<Event>, MgmtError> {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.len() > MAX_LINE {
            return Err(MgmtError::LineTooLong);
        }
        if let Some(rest) = line.strip_prefix(">CLIENT:") {
            return self.client(rest);
        }
        if let Some(rest) = line.strip_prefix('>') {
            let (name, text) = rest.split_once(':').unwrap_or((rest, ""));
            return Ok(Some(match name {
                "HOLD" => Event::Hold,
                "INFO" => Event::Info(text.to_owned()),
                _ => Event::Notification {
                    name: name.to_owned(),
                    text: text.to_owned(),
                },
            }));
        }
        if let Some(rest) = line.strip_prefix("SUCCESS:") {
            return Ok(Some(Event::Success(rest.trim().to_owned())));
        }
        if let Some(rest) = line.strip_prefix("ERROR:") {
            return Ok(Some(Event::Error(rest.trim().to_owned())));
        }
        if line == "END" {
            return Ok(Some(Event::End));
        }
        Ok(Some(Event::Data(line.to_owned())))
    }

    fn client(&mut self, rest: &str) -> Result<Option<Event>, MgmtError> {
        if let Some(env) = rest.strip_prefix("ENV,") {
            if env == "END" {
                self.skipping = false;
                let Some(p) = self.pending.take() else {
                    return Err(MgmtError::StrayEnv);
                };
                return Ok(Some(Event::Client {
                    kind: p.kind,
                    cid: p.cid,
                    kid: p.kid,
                    env: Env(p.env),
                }));
            }
            if self.skipping {
                return Ok(None);
            }
            let Some(p) = self.pending.as_mut() else {
                return Err(MgmtError::StrayEnv);
            };
            if p.env.len() >= MAX_ENV {
                self.pending = None;
                self.skipping = true;
                return Err(MgmtError::TooManyEnv);
            }
            let (k, v) = env.split_once('=').unwrap_or((env, ""));
            p.env.push((k.to_owned(), v.to_owned()));
            return Ok(None);
        }
        let mut parts = rest.split(',');
        let kind = parts.next().unwrap_or("");
        let kind = match kind {
            "CONNECT" => ClientKind::Connect,
            "REAUTH" => ClientKind::Reauth,
            "ESTABLISHED" => ClientKind::Established,
            "DISCONNECT" => ClientKind::Disconnect,
            "ADDRESS" => {
                let cid = number(parts.next().unwrap_or(""), "client id")?;
                let addr = parts.next().unwrap_or("").to_owned();
                return Ok(Some(Event::Address { cid, addr }));
            }
            // Notifications this code does not use (CR_RESPONSE, PF, …) are reported, not errors.
            other => {
                return Ok(Some(Event::Notification {
                    name: format!("CLIENT:{other}"),
                    text: rest.to_owned(),
                }))
            }
        };
        let cid = number(parts.next().unwrap_or(""), "client id")?;
        let kid = match kind {
            ClientKind::Connect | ClientKind::Reauth => {
                Some(number(parts.next().unwrap_or(""), "key id")?)
            }
            _ => None,
        };
        let unfinished = self.pending.replace(Pending {
            kind,
            cid,
            kid,
            env: Vec::new(),
        });
        self.skipping = false;
        if unfinished.is_some() {
            return Err(MgmtError::Unterminated);
        }
        Ok(None)
    }
}

/// Quote an argument for a management command: double quotes, with `\` and `"` escaped. Control characters are
/// replaced (a line break would end the command early).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Accept a client and give it `config` lines (for example `ifconfig-push …`): the whole multi-line command.
pub fn client_auth(cid: u64, kid: u64, config: &[String]) -> String {
    let mut s = format!("client-auth {cid} {kid}\n");
    for line in config {
        // A config line is one line by construction; a stray break must not inject a command.
        s.push_str(&line.replace(['\r', '\n'], " "));
        s.push('\n');
    }
    s.push_str("END\n");
    s
}

/// Accept a client without config lines (re-authentication keeps the address it has).
pub fn client_auth_nt(cid: u64, kid: u64) -> String {
    format!("client-auth-nt {cid} {kid}\n")
}

/// Deny a client; it sees `AUTH_FAILED,{reason}`.
pub fn client_deny(cid: u64, kid: u64, reason: &str) -> String {
    let q = quote(reason);
    format!("client-deny {cid} {kid} {q} {q}\n")
}

/// Tell a client to stop and end its session.
pub fn client_kill(cid: u64) -> String {
    format!("client-kill {cid} HALT\n")
}

/// End a client's session and tell it to connect again (its connection may still be used, on another device).
pub fn client_restart(cid: u64) -> String {
    format!("client-kill {cid} RESTART\n")
}

/// One client of a `status 3` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusClient {
    pub common_name: String,
    pub virtual_address: String,
    pub cid: u64,
}

/// Parse a `CLIENT_LIST` line of `status 3` (tab-separated: name, real address, virtual address, virtual IPv6,
/// bytes in, bytes out, connected since, since as time_t, username, client id, …). Other lines give `None`.
pub fn status_client(line: &str) -> Option<StatusClient> {
    let f: Vec<&str> = line.split('\t').collect();
    if f.first() != Some(&"CLIENT_LIST") || f.len() < 11 {
        return None;
    }
    Some(StatusClient {
        common_name: f[1].to_owned(),
        virtual_address: f[3].to_owned(),
        cid: number(f[10], "client id").ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn feed_all(p: &mut Parser, lines: &[&str]) -> Vec<Result<Option<Event>, MgmtError>> {
        lines.iter().map(|l| p.feed(l)).collect()
    }

    #[test]
    fn connect_block_with_interleaved_reply() {
        let mut p = Parser::new();
        let out = feed_all(
            &mut p,
            &[
                ">CLIENT:CONNECT,7,1",
                ">CLIENT:ENV,username=pfabc",
                "SUCCESS: client-kill command succeeded",
                ">CLIENT:ENV,password=se=cret",
                ">CLIENT:ENV,untrusted_ip=10.0.0.9",
                ">CLIENT:ENV,END",
            ],
        );
        assert_eq!(out[0], Ok(None));
        assert_eq!(
            out[2],
            Ok(Some(Event::Success("client-kill command succeeded".into())))
        );
        let Ok(Some(Event::Client {
            kind,
            cid,
            kid,
            env,
        })) = &out[5]
        else {
            panic!("no block: {out:?}");
        };
        assert_eq!((*kind, *cid, *kid), (ClientKind::Connect, 7, Some(1)));
        assert_eq!(env.get("username"), Some("pfabc"));
        assert_eq!(
            env.get("password"),
            Some("se=cret"),
            "split at the first '='"
        );
        assert!(!format!("{env:?}").contains("se=cret"), "password redacted");
    }

    #[test]
    fn single_lines_and_replies() {
        let mut p = Parser::new();
        assert_eq!(
            p.feed(">INFO:OpenVPN Management Interface Version 5"),
            Ok(Some(Event::Info(
                "OpenVPN Management Interface Version 5".into()
            )))
        );
        assert_eq!(
            p.feed(">HOLD:Waiting for hold release:0"),
            Ok(Some(Event::Hold))
        );
        assert_eq!(
            p.feed(">CLIENT:ADDRESS,3,10.77.0.16,1"),
            Ok(Some(Event::Address {
                cid: 3,
                addr: "10.77.0.16".into()
            }))
        );
        assert_eq!(
            p.feed("ERROR: client not found"),
            Ok(Some(Event::Error("client not found".into())))
        );
        assert_eq!(p.feed("END\r"), Ok(Some(Event::End)));
        assert!(matches!(
            p.feed(">BYTECOUNT_CLI:3,100,200"),
            Ok(Some(Event::Notification { .. }))
        ));
    }

    #[test]
    fn malformed_lines_are_errors_and_the_parser_recovers() {
        let mut p = Parser::new();
        assert!(p.feed(">CLIENT:CONNECT,x,1").is_err());
        assert!(p.feed(">CLIENT:CONNECT,1").is_err(), "missing key id");
        assert_eq!(p.feed(">CLIENT:ENV,a=b"), Err(MgmtError::StrayEnv));
        assert_eq!(p.feed(">CLIENT:ENV,END"), Err(MgmtError::StrayEnv));
        assert_eq!(
            p.feed(&"x".repeat(MAX_LINE + 1)),
            Err(MgmtError::LineTooLong)
        );
        // An unfinished block replaced by a new one.
        assert_eq!(p.feed(">CLIENT:CONNECT,1,0"), Ok(None));
        assert_eq!(p.feed(">CLIENT:DISCONNECT,1"), Err(MgmtError::Unterminated));
        assert!(matches!(
            p.feed(">CLIENT:ENV,END"),
            Ok(Some(Event::Client {
                kind: ClientKind::Disconnect,
                cid: 1,
                kid: None,
                ..
            }))
        ));
    }

    #[test]
    fn oversized_block_is_dropped_whole() {
        let mut p = Parser::new();
        assert_eq!(p.feed(">CLIENT:CONNECT,1,0"), Ok(None));
        for i in 0..MAX_ENV {
            assert_eq!(p.feed(&format!(">CLIENT:ENV,v{i}=x")), Ok(None));
        }
        assert_eq!(
            p.feed(">CLIENT:ENV,one=toomany"),
            Err(MgmtError::TooManyEnv)
        );
        assert_eq!(p.feed(">CLIENT:ENV,more=x"), Ok(None));
        assert_eq!(p.feed(">CLIENT:ENV,END"), Err(MgmtError::StrayEnv));
        // The next block is whole again.
        assert_eq!(p.feed(">CLIENT:ESTABLISHED,2"), Ok(None));
        assert!(matches!(
            p.feed(">CLIENT:ENV,END"),
            Ok(Some(Event::Client { cid: 2, .. }))
        ));
    }

    #[test]
    fn commands_cannot_be_injected() {
        assert_eq!(
            client_deny(1, 2, "bad\"\nclient-kill 9"),
            "client-deny 1 2 \"bad\\\" client-kill 9\" \"bad\\\" client-kill 9\"\n"
        );
        assert_eq!(
            client_auth(4, 0, &["ifconfig-push 10.77.0.16 255.255.0.0\nEND".into()]),
            "client-auth 4 0\nifconfig-push 10.77.0.16 255.255.0.0 END\nEND\n"
        );
        assert_eq!(client_kill(5), "client-kill 5 HALT\n");
        assert_eq!(client_restart(5), "client-kill 5 RESTART\n");
    }

    #[test]
    fn status_client_lines() {
        let line = "CLIENT_LIST\tpfabc\t10.0.0.9:5000\t10.77.0.16\t\t100\t200\tThu\t1700000000\tpfabc\t12\t0\tAES-256-GCM";
        assert_eq!(
            status_client(line),
            Some(StatusClient {
                common_name: "pfabc".into(),
                virtual_address: "10.77.0.16".into(),
                cid: 12
            })
        );
        assert_eq!(status_client("HEADER\tCLIENT_LIST\tCommon Name"), None);
        assert_eq!(status_client("CLIENT_LIST\tshort"), None);
    }

    proptest! {
        #[test]
        fn any_lines_never_panic_and_blocks_stay_bounded(lines in proptest::collection::vec(
            prop_oneof![
                ".{0,40}",
                "(>CLIENT:(CONNECT|REAUTH|ESTABLISHED|DISCONNECT|ADDRESS),[0-9]{0,3},[0-9]{0,3})",
                "(>CLIENT:ENV,[a-z_]{0,8}=.{0,10})",
                Just(">CLIENT:ENV,END".to_owned()),
            ], 0..400)) {
            let mut p = Parser::new();
            for l in &lines {
                if let Ok(Some(Event::Client { env, .. })) = p.feed(l) {
                    prop_assert!(env.len() <= MAX_ENV);
                }
            }
            prop_assert!(p.pending.as_ref().is_none_or(|b| b.env.len() <= MAX_ENV));
        }
    }
}
