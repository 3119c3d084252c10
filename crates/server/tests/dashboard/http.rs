//! Plain HTTP checks: state changes need the CSRF token, the login form has its own, cookies carry the right
//! flags, operator text is escaped, password change and lockouts read in plain words, the live stream is scoped to
//! its operator and ends with the session.

use serde_json::{json, Value};

use crate::common::{TestServer, ADMIN_PASSWORD};
use crate::rig::opts;

/// The page's CSRF token, from its `<meta name="csrf-token">`.
fn csrf_of(page: &str) -> String {
    let i = page.find("name=\"csrf-token\" content=\"").unwrap() + 27;
    page[i..i + page[i..].find('"').unwrap()].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_need_the_csrf_token_and_operator_text_is_escaped() {
    let Some(s) = TestServer::start(opts()).await else {
        return;
    };
    let token = s.admin_token().await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let cookie = format!("pf_session={token}");

    // Not logged in: pages send to the login form.
    let r = http.get(s.url("/connections")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/login");

    // Logged in: the login form sends on to the connections.
    let r = http
        .get(s.url("/login"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/connections");

    let r = s
        .post(
            "/api/v1.0/devices",
            &token,
            json!({"name": "<script>alert(1)</script>"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let device = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let page = http
        .get(s.url("/devices"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.headers()["cache-control"], "no-store");
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));
    let page = page.text().await.unwrap();
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "operator text is escaped"
    );
    assert!(!page.contains("<script>alert"));
    let csrf = csrf_of(&page);

    let form =
        |extra: &str| format!("name=c1&device_id={device}&limit=1&unit=GB&enabled=on{extra}");
    let post = |body: String| {
        http.post(s.url("/connections"))
            .header("cookie", &cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
    };
    for (what, body) in [
        ("no token", form("")),
        ("a wrong token", form("&_csrf=forged")),
        ("an empty token", form("&_csrf=")),
    ] {
        let r = post(body).await.unwrap();
        assert_eq!(r.status(), 403, "a form post with {what} is refused");
    }
    // Another session's token does not work either.
    let other = csrf_of(
        &http
            .get(s.url("/devices"))
            .header(
                "cookie",
                format!("pf_session={}", s.login("admin", ADMIN_PASSWORD).await),
            )
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert_ne!(other, csrf);
    assert_eq!(
        post(form(&format!("&_csrf={other}")))
            .await
            .unwrap()
            .status(),
        403
    );
    let list: Value = s
        .get("/api/v1.0/connections", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list, json!([]), "nothing was created");

    // A refusal is shown next to the field it is about.
    let long = "x".repeat(1001);
    let r = http
        .post(s.url(&format!("/devices/{device}/rename")))
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("_csrf={csrf}&name=ok&description={long}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let page = r.text().await.unwrap();
    assert_eq!(
        note(&page, "rename-description-note"),
        "Description must be at most 1000 characters."
    );
    assert!(page.contains("aria-describedby=\"rename-description-note\""));

    // Logout without the token does not end the session.
    let r = http
        .post(s.url("/logout"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(s.get("/api/v1.0/connections", &token).await.status(), 200);

    // With the token (form field or header) it goes through.
    let r = post(form(&format!("&_csrf={csrf}"))).await.unwrap();
    assert_eq!(r.status(), 201);
    assert!(r.text().await.unwrap().contains("id=\"once-password\""));
    let r = http
        .post(s.url("/logout"))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    assert_eq!(
        s.get("/api/v1.0/connections", &token).await.status(),
        401,
        "logout ended the session"
    );

    // The login form has its own token, bound to a cookie set with the form.
    let r = http
        .post(s.url("/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("username=admin&password={ADMIN_PASSWORD}&_csrf=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (form_cookie, r) = login_form(&s, "admin", ADMIN_PASSWORD).await;
    assert!(
        form_cookie.contains("HttpOnly")
            && form_cookie.contains("SameSite=Strict")
            && !form_cookie.contains("Secure"),
        "{form_cookie}"
    );
    assert_eq!(r.status(), 303);
    let set = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    assert!(set.iter().any(|c| c.starts_with("pf_session=")
        && c.contains("HttpOnly")
        && c.contains("SameSite=Strict")));
}

/// A dashboard client: a cookie jar of one session cookie, no redirects followed.
struct Browser {
    http: reqwest::Client,
    cookie: String,
}

impl Browser {
    fn new(token: &str) -> Browser {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Browser {
            http,
            cookie: format!("pf_session={token}"),
        }
    }

    async fn get(&self, s: &TestServer, path: &str) -> reqwest::Response {
        self.http
            .get(s.url(path))
            .header("cookie", &self.cookie)
            .send()
            .await
            .unwrap()
    }

    async fn page(&self, s: &TestServer, path: &str) -> String {
        let r = self.get(s, path).await;
        assert_eq!(r.status(), 200, "{path}");
        r.text().await.unwrap()
    }

    async fn post(&self, s: &TestServer, path: &str, body: String) -> reqwest::Response {
        self.http
            .post(s.url(path))
            .header("cookie", &self.cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap()
    }
}

/// The text of the note with this id (`<p … id="ID" …>TEXT</p>`).
fn note(page: &str, id: &str) -> String {
    let Some(i) = page.find(&format!("id=\"{id}\"")) else {
        return String::new();
    };
    let start = i + page[i..].find('>').unwrap() + 1;
    page[start..start + page[start..].find('<').unwrap()].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_openvpn_door_off_the_connection_page_says_so_and_offers_no_profile() {
    let Some(s) = TestServer::start(opts()).await else {
        return;
    };
    let token = s.admin_token().await;
    let conn = crate::common::connection_on_new_device(&s, &token, "no vpn").await;
    let id = conn["id"].as_str().unwrap();
    assert!(conn["openvpn"].is_null(), "{conn}");
    let b = Browser::new(&token);
    let page = b.page(&s, &format!("/connections/{id}")).await;
    assert!(page.contains("<dt>OpenVPN</dt><dd>off</dd>"), "{page}");
    assert!(!page.contains("profile.ovpn"));
    let r = b.get(&s, &format!("/connections/{id}/profile.ovpn")).await;
    assert_eq!(r.status(), 404);
    assert!(r.headers().get("content-disposition").is_none());
    assert_eq!(
        note(&r.text().await.unwrap(), "openvpn-note"),
        "The OpenVPN door is off on this server."
    );
    // Another operator's connection is simply not found: ownership is checked before the door.
    s.create_operator("other", ADMIN_PASSWORD, proxyfleet::store::Role::Operator)
        .await;
    let other = Browser::new(&s.login("other", ADMIN_PASSWORD).await);
    let r = other
        .get(&s, &format!("/connections/{id}/profile.ovpn"))
        .await;
    assert_eq!(r.status(), 404);
    let text = r.text().await.unwrap();
    assert!(!text.contains("OpenVPN door"), "{text}");
    assert!(!text.contains(conn["username"].as_str().unwrap()));
}

/// A connection whose device was revoked can still be saved from its page (renamed, disabled) without moving it:
/// the form keeps its own revoked device selectable (a disabled option would not be sent), while other revoked
/// devices stay unselectable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_on_a_revoked_device_can_still_be_saved() {
    let Some(s) = TestServer::start(opts()).await else {
        return;
    };
    let token = s.admin_token().await;
    let conn = crate::common::connection_on_new_device(&s, &token, "on revoked").await;
    let (id, dev) = (
        conn["id"].as_str().unwrap(),
        conn["device_id"].as_str().unwrap(),
    );
    let other = crate::common::connection_on_new_device(&s, &token, "elsewhere").await;
    let other_dev = other["device_id"].as_str().unwrap();
    for d in [dev, other_dev] {
        let r = s
            .post(&format!("/api/v1.0/devices/{d}/revoke"), &token, json!({}))
            .await;
        assert!(r.status().is_success(), "{}", r.status());
    }
    let b = Browser::new(&token);
    let page = b.page(&s, &format!("/connections/{id}")).await;
    let option = |d: &str| {
        let i = page
            .find(&format!("<option value=\"{d}\""))
            .expect("the device is listed");
        page[i..i + page[i..].find('>').unwrap()].to_owned()
    };
    assert!(
        option(dev).contains("selected") && !option(dev).contains("disabled"),
        "{}",
        option(dev)
    );
    assert!(
        option(other_dev).contains("disabled"),
        "{}",
        option(other_dev)
    );
    // What a browser submits: the selected option's value, the other fields, no "enabled" (unchecked).
    let body = format!(
        "_csrf={}&name=renamed&device_id={dev}&limit=&unit=GB",
        csrf_of(&page)
    );
    let r = b.post(&s, &format!("/connections/{id}"), body).await;
    assert!(
        r.status().is_redirection() || r.status() == 200,
        "{}",
        r.status()
    );
    let v: serde_json::Value = s
        .get(&format!("/api/v1.0/connections/{id}"), &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (v["name"].as_str(), v["state"].as_str()),
        (Some("renamed"), Some("disabled")),
        "{v}"
    );
}

/// A device whose agent predates ping and DNS over TCP says "update it" on its page; this release's agent does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_an_outdated_agent_says_to_update_it() {
    use proxyfleet_proto::control::{caps, ControlFrame, Hello};
    let Some(s) = TestServer::start(opts()).await else {
        return;
    };
    let token = s.admin_token().await;
    let (id, dir) = crate::common::enrolled_device(&s, &token, "old phone").await;
    let b = Browser::new(&token);
    let page_when = |want: String| {
        let (b, s, id) = (&b, &s, &id);
        async move {
            for _ in 0..100 {
                let page = b.page(s, &format!("/devices/{id}")).await;
                if page.contains(&want) {
                    return page;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            panic!("the device page never showed {want:?}");
        }
    };
    let hello = Hello {
        protocol_version: proxyfleet_proto::PROTOCOL_VERSION,
        agent_version: "0.0.9".into(),
        capabilities: caps::TCP | caps::UDP,
    };
    let (old, answer) = crate::common::HandTunnel::hello(&s, dir.path(), hello).await;
    assert!(matches!(answer, ControlFrame::HelloAck(_)), "{answer:?}");
    let page = page_when("<dt>Agent</dt><dd>0.0.9".into()).await;
    assert!(
        page.contains(
            "update it: ping and DNS over TCP through the OpenVPN door need a newer agent"
        ),
        "{page}"
    );
    drop(old);
    let agent = crate::rig::spawn_agent(dir.path());
    // Exactly the version: no warning after it.
    let page = page_when(format!(
        "<dt>Agent</dt><dd>{}</dd>",
        env!("CARGO_PKG_VERSION")
    ))
    .await;
    assert!(!page.contains("update it"), "{page}");
    agent.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_change_and_lockouts_read_in_plain_words() {
    let Some(s) = TestServer::start(opts()).await else {
        return;
    };
    let token = s.admin_token().await;
    let b = Browser::new(&token);
    let csrf = csrf_of(&b.page(&s, "/account").await);
    let change = |current: &str, new: &str, repeat: &str| {
        format!(
            "_csrf={csrf}&current_password={current}&new_password={new}&repeat_password={repeat}"
        )
    };
    let new = "Another-Str0ng-Secret";
    let r = b
        .post(&s, "/account/password", change(ADMIN_PASSWORD, new, "typo"))
        .await;
    assert_eq!(r.status(), 422);
    assert_eq!(
        note(&r.text().await.unwrap(), "pw-repeat_password-note"),
        "The two new passwords differ."
    );
    let r = b
        .post(&s, "/account/password", change("Wrong-Passw0rd!", new, new))
        .await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        note(&r.text().await.unwrap(), "pw-current_password-note"),
        "Current password is incorrect."
    );
    let r = b
        .post(
            &s,
            "/account/password",
            change(ADMIN_PASSWORD, "short", "short"),
        )
        .await;
    assert_eq!(r.status(), 422);
    assert!(note(&r.text().await.unwrap(), "pw-new_password-note").contains("at least 8"));

    let r = b
        .post(&s, "/account/password", change(ADMIN_PASSWORD, new, new))
        .await;
    assert_eq!(r.status(), 200);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    let fresh = set
        .trim_start_matches("pf_session=")
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert!(r.text().await.unwrap().contains("Password changed."));
    assert_eq!(
        s.get("/api/v1.0/devices", &token).await.status(),
        401,
        "the old session ended"
    );
    assert_eq!(
        s.get("/api/v1.0/devices", &fresh).await.status(),
        200,
        "the new cookie works"
    );
    let b = Browser::new(&fresh);
    b.page(&s, "/account").await;

    // Five wrong passwords lock the username; the form says for how long, and the same for an unknown name.
    let unknown = login(&s, "nobody", "Wrong-Passw0rd!").await;
    assert_eq!(
        unknown,
        (401, "Invalid username or password.".to_owned()),
        "no enumeration"
    );
    for _ in 0..5 {
        assert_eq!(login(&s, "admin", "Wrong-Passw0rd!").await.0, 401);
    }
    let (status, text) = login(&s, "admin", new).await;
    assert_eq!(status, 429);
    assert!(
        text.starts_with("Too many attempts; try again in "),
        "{text}"
    );
}

/// Submit the login form as a new browser would (form first, for its CSRF cookie): the form's `Set-Cookie` and
/// the answer to the submission.
async fn login_form(s: &TestServer, user: &str, pw: &str) -> (String, reqwest::Response) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http.get(s.url("/login")).send().await.unwrap();
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    let nonce = set
        .trim_start_matches("pf_login=")
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let r = http
        .post(s.url("/login"))
        .header("cookie", format!("pf_login={nonce}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("_csrf={nonce}&username={user}&password={pw}"))
        .send()
        .await
        .unwrap();
    (set, r)
}

/// The login form's status and message.
async fn login(s: &TestServer, user: &str, pw: &str) -> (u16, String) {
    let (_, r) = login_form(s, user, pw).await;
    (
        r.status().as_u16(),
        note(&r.text().await.unwrap(), "login-note"),
    )
}

/// The next server-sent event of `resp` (its `event:` name and `data:`), reading into `buf`; `None` at the end.
/// The item keys of a `snapshot` event's data.
fn snapshot_keys(data: &str) -> Vec<String> {
    let snap: Value = serde_json::from_str(data).unwrap();
    snap["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap().to_owned())
        .collect()
}

async fn next_event(resp: &mut reqwest::Response, buf: &mut String) -> Option<(String, String)> {
    loop {
        if let Some(i) = buf.find("\n\n") {
            let block: String = buf.drain(..i + 2).collect();
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim_start().to_owned())
            };
            // Keep-alive comments have neither.
            if let (Some(event), Some(data)) = (field("event:"), field("data:")) {
                return Some((event, data));
            }
            continue;
        }
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), resp.chunk())
            .await
            .expect("an event within 10 s")
            .unwrap()?;
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_stream_is_scoped_and_ends_with_the_session() {
    let Some(s) = TestServer::start(opts()).await else {
        return;
    };
    let token = s.admin_token().await;
    s.create_operator(
        "bob",
        "B0b-Strong-Phrase",
        proxyfleet::store::Role::Operator,
    )
    .await;
    let bob = s.login("bob", "B0b-Strong-Phrase").await;
    let mut ids = Vec::new();
    for (t, name) in [(&token, "mine"), (&bob, "bobs")] {
        let r = s
            .post("/api/v1.0/devices", t, json!({ "name": name }))
            .await;
        ids.push(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let mut resp = reqwest::Client::new()
        .get(s.url("/dashboard/events"))
        .header("cookie", format!("pf_session={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut buf = String::new();
    let (event, data) = next_event(&mut resp, &mut buf).await.unwrap();
    assert_eq!(event, "snapshot");
    let snap: Value = serde_json::from_str(&data).unwrap();
    assert_eq!(
        snapshot_keys(&data),
        [format!("device:{}", ids[0])],
        "only the operator's own devices"
    );
    assert_eq!(
        snap["items"][0]["cells"]["status"],
        "Waiting for enrollment"
    );

    // Later events carry only what changed: a new device, not the one already sent.
    let r = s
        .post("/api/v1.0/devices", &token, json!({ "name": "second" }))
        .await;
    let second = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (event, data) = next_event(&mut resp, &mut buf).await.unwrap();
    assert_eq!(event, "snapshot");
    assert_eq!(
        snapshot_keys(&data),
        [format!("device:{second}")],
        "only the change"
    );

    // A page that shows only connections gets only connections.
    let mut conns_only = reqwest::Client::new()
        .get(s.url("/dashboard/events?kinds=conn"))
        .header("cookie", format!("pf_session={token}"))
        .send()
        .await
        .unwrap();
    let (_, data) = next_event(&mut conns_only, &mut String::new())
        .await
        .unwrap();
    assert_eq!(data, r#"{"items":[]}"#);

    let r = s.post("/api/v1.0/auth/logout", &token, json!({})).await;
    assert_eq!(r.status(), 204);
    let (event, _) = next_event(&mut resp, &mut buf).await.unwrap();
    assert_eq!(event, "ended", "the stream says the session ended");
    assert!(
        next_event(&mut resp, &mut buf).await.is_none(),
        "and closes"
    );
    let r = reqwest::Client::new()
        .get(s.url("/dashboard/events"))
        .header("cookie", format!("pf_session={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no stream without a live session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookies_are_secure_when_the_public_url_is_https() {
    let mut o = opts();
    o.raw.public_url = Some("https://fleet.example.com".into());
    let Some(s) = TestServer::start(o).await else {
        return;
    };
    s.create_operator("admin", ADMIN_PASSWORD, proxyfleet::store::Role::Admin)
        .await;
    let (form_cookie, r) = login_form(&s, "admin", ADMIN_PASSWORD).await;
    assert!(form_cookie.ends_with("; Secure"), "{form_cookie}");
    assert_eq!(r.status(), 303);
    let session = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned());
    let session: Vec<String> = session.filter(|c| c.starts_with("pf_session=")).collect();
    assert_eq!(session.len(), 1);
    assert!(
        session[0].contains("HttpOnly; SameSite=Strict; Secure"),
        "{session:?}"
    );
}
