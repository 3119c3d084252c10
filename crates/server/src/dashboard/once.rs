//! The one-time view of a connection's credentials, after "Create" or "Regenerate Password": the password, the
//! HTTP and SOCKS5 proxy URLs and the OpenVPN profile, each with a copy or download button. Nothing of it is kept:
//! the server has only the bcrypt hash, the page is `no-store`, and no other page renders a password.

use maud::{html, Markup};
use serde_json::Value;

use super::layout::secret_row;

/// What the create and regenerate-password answers give the operator once.
pub struct OneTime {
    pub id: String,
    pub name: String,
    pub username: String,
    pub password: String,
    pub http_url: Option<String>,
    pub socks5_url: Option<String>,
    /// The `.ovpn` profile with the credentials inline; `None` when the OpenVPN door is off.
    pub ovpn: Option<String>,
}

/// The `.ovpn` profile in a create or regenerate-password answer (`ovpn`, null when the OpenVPN door is off).
fn ovpn_profile(answer: &Value) -> Option<String> {
    answer["ovpn"].as_str().map(str::to_owned)
}

impl OneTime {
    /// From the API's `ConnectionWithPassword` answer.
    pub fn from_answer(answer: &Value) -> OneTime {
        let s = |k: &str| answer[k].as_str().unwrap_or("").to_owned();
        let opt = |k: &str| answer[k].as_str().map(str::to_owned);
        OneTime {
            id: s("id"),
            name: s("name"),
            username: s("username"),
            password: s("password"),
            http_url: opt("http_url"),
            socks5_url: opt("socks5_url"),
            ovpn: ovpn_profile(answer),
        }
    }

    /// The panel. `what` says what just happened ("created", "has a new password").
    pub fn render(&self, what: &str) -> Markup {
        html! {
            section.card.once aria-labelledby="once-title" {
                h2 id="once-title" { "“" (self.name) "” " (what) }
                p.warn { "Copy these now: the password is shown only on this page. After you leave it, it cannot "
                    "be shown again — only replaced with “Regenerate Password”." }
                (secret_row("once-username", "Username", &self.username))
                (secret_row("once-password", "Password", &self.password))
                @match &self.http_url {
                    Some(u) => (secret_row("once-http", "HTTP proxy URL", u)),
                    None => p.hint { "The HTTP proxy door is off." },
                }
                @match &self.socks5_url {
                    Some(u) => (secret_row("once-socks5", "SOCKS5 proxy URL", u)),
                    None => p.hint { "The SOCKS5 door is off." },
                }
                @match &self.ovpn {
                    Some(profile) => div.secret {
                        textarea id="once-ovpn" hidden readonly aria-hidden="true" { (profile) }
                        button type="button" data-download="once-ovpn"
                            data-filename=(format!("{}.ovpn", self.username)) { "Download .ovpn" }
                    },
                    None => p.hint id="once-ovpn-off" { "OpenVPN door is off: no .ovpn profile." },
                }
                p { a href=(format!("/connections/{}", self.id)) { "Done — go to the connection" } }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ovpn: Option<&str>) -> OneTime {
        OneTime {
            id: "c1".into(),
            name: "<b>shop</b>".into(),
            username: "pfabc".into(),
            password: "Secr3t".into(),
            http_url: Some("http://pfabc:Secr3t@h:3128".into()),
            socks5_url: None,
            ovpn: ovpn.map(str::to_owned),
        }
    }

    #[test]
    fn the_profile_comes_from_the_api_answer() {
        let answer = serde_json::json!({"id": "c1", "name": "n", "username": "pfabc", "password": "p",
            "ovpn": "client\nremote h 1194\n"});
        assert_eq!(
            OneTime::from_answer(&answer).ovpn.as_deref(),
            Some("client\nremote h 1194\n")
        );
        let off =
            serde_json::json!({"id": "c1", "username": "pfabc", "password": "p", "ovpn": null});
        assert_eq!(OneTime::from_answer(&off).ovpn, None);
    }

    #[test]
    fn the_profile_is_offered_as_a_download_only_when_there_is_one() {
        let with = sample(Some(
            "client\n<auth-user-pass>\npfabc\nSecr3t\n</auth-user-pass>",
        ))
        .render("created")
        .into_string();
        assert!(with.contains("data-download=\"once-ovpn\""));
        assert!(with.contains("data-filename=\"pfabc.ovpn\""));
        assert!(
            with.contains("&lt;auth-user-pass&gt;"),
            "the profile text is escaped inside the textarea"
        );
        let without = sample(None).render("created").into_string();
        assert!(!without.contains("data-download"));
        assert!(without.contains("OpenVPN door is off"));
        assert!(without.contains("The SOCKS5 door is off"));
        assert!(
            without.contains("&lt;b&gt;shop&lt;/b&gt;"),
            "operator text is escaped"
        );
    }
}
