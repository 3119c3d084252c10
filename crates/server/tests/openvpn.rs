//! The OpenVPN door end to end, with the real `openvpn` server and clients in network namespaces made by the test
//! (see `vpn/mod.rs` for the topology). Needs root; skips with a printed reason otherwise (`.ci/run` runs as root
//! and requires it).

#![allow(clippy::unwrap_used)]

mod common;
mod vpn;

use std::net::IpAddr;
use std::time::Duration;

use proxyfleet::config::RawConfig;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use vpn::{curl, start_target, Client, Topology, Vpn, DEV_OUT, HELLO, TARGET_NAME};

const CONNECT: Duration = Duration::from_secs(20);

/// Run `body` with the test thread inside the server's namespace.
fn in_server_ns<F, Fut>(test: u32, body: F)
where
    F: FnOnce(Topology) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Some(topo) = Topology::create(test) else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    topo.srv.enter();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(body(topo));
}

/// An IPv6 web site the customer reaches through its own network (the server namespace stands in for its ISP):
/// the customer gets an IPv6 address and default route, the site answers `direct`. Returns its URL.
fn ipv6_site(topo: &Topology) -> String {
    let ip = |ns: &str, args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["-n", ns])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    };
    let (srv, cust) = (topo.srv.name.as_str(), topo.cust.name.as_str());
    ip(
        srv,
        &[
            "addr",
            "add",
            "2001:db8:c::1/64",
            "dev",
            "eth-cust",
            "nodad",
        ],
    );
    ip(srv, &["addr", "add", "2001:db8:99::1/128", "dev", "lo"]);
    ip(
        cust,
        &["addr", "add", "2001:db8:c::2/64", "dev", "eth-srv", "nodad"],
    );
    ip(
        cust,
        &["-6", "route", "add", "default", "via", "2001:db8:c::1"],
    );
    // This thread is in the server namespace.
    let l = std::net::TcpListener::bind("[2001:db8:99::1]:8099").unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut b = [0u8; 1024];
            let _ = std::io::Read::read(&mut s, &mut b);
            let _ = std::io::Write::write_all(
                &mut s,
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\ndirect",
            );
        }
    });
    "http://[2001:db8:99::1]:8099/".to_owned()
}

#[test]
fn vpn_customer_browses_through_the_device_and_dns_is_answered_there() {
    in_server_ns(1, |topo| async move {
        let stop = CancellationToken::new();
        let target = start_target(&topo.tgt, stop.clone());
        let v = Vpn::start(&topo, RawConfig::default()).await;
        // The door forwards from its own interfaces only; the server as a whole does not become a router.
        for dev in ["all", "eth-cust", "eth-dev"] {
            let f = std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{dev}/forwarding"))
                .unwrap();
            assert_eq!(f.trim(), "0", "forwarding on {dev}");
        }
        let conn = v.create(None).await;
        let (user, pass) = (
            conn["username"].as_str().unwrap(),
            conn["password"].as_str().unwrap(),
        );
        let ovpn = conn["ovpn"]
            .as_str()
            .expect("the create answer holds the profile");
        assert!(ovpn.contains(&format!(
            "<auth-user-pass>\n{user}\n{pass}\n</auth-user-pass>"
        )));

        // The customer is dual-stack: an IPv6 site is reachable through its own network, around any VPN.
        let v6_site = ipv6_site(&topo);
        let (ok, _, body) = curl(&topo.cust, &v6_site, 5).await;
        assert!(ok && body == "direct", "IPv6 works without the VPN: {body}");

        let c = Client::start(&topo.cust, &v.profile_file("c1.ovpn", ovpn));
        assert!(
            c.connected(CONNECT).await,
            "client connects:\n{}",
            c.log_text()
        );
        // With the VPN up, IPv6 goes into the tunnel and is refused there: nothing leaves around it.
        let (ok, _, body) = curl(&topo.cust, &v6_site, 5).await;
        assert!(!ok, "IPv6 leaked around the VPN: {body}");
        let (ok, _, body) = curl(&topo.cust, &format!("http://{TARGET_NAME}/"), 15).await;
        if !ok {
            vpn::dump(&topo.srv);
            vpn::dump(&topo.cust);
        }
        assert!(
            ok,
            "curl through the VPN succeeds; DNS seen: {:?}",
            target.dns_queries.lock().unwrap()
        );
        assert_eq!(body, HELLO);
        // The target saw the device's address, and the name was resolved by the device's resolver.
        assert_eq!(
            target.http_peers.lock().unwrap().as_slice(),
            &[IpAddr::from(DEV_OUT)]
        );
        let queries = target.dns_queries.lock().unwrap().clone();
        assert!(
            queries
                .iter()
                .any(|(from, name)| *from == IpAddr::from(DEV_OUT) && name == TARGET_NAME),
            "DNS query reached the target's resolver from the device: {queries:?}"
        );
        // DNS over TCP to the pushed address is answered by the device's resolver too.
        let dns = std::net::SocketAddr::new(vpn::VPN_DNS.parse().unwrap(), 53);
        let answer = vpn::dns_over_tcp(&topo.cust, dns, TARGET_NAME)
            .await
            .expect("DNS over TCP through the VPN");
        assert_eq!(&answer[..2], &[0x5e, 0xed], "the answer to our query");
        assert_eq!(answer[answer.len() - 4..], vpn::TARGET.octets());
        assert_eq!(
            target.dns_tcp_queries.lock().unwrap().as_slice(),
            &[(IpAddr::from(DEV_OUT), TARGET_NAME.to_owned())],
            "the TCP query reached the device's resolver from the device"
        );
        let used = v.connection(conn["id"].as_str().unwrap()).await["used_bytes"]
            .as_u64()
            .unwrap();
        assert!(used > HELLO.len() as u64, "VPN traffic is metered: {used}");
        // The server's own services are not reachable over the VPN: a service listening on every address of the
        // server answers locally but not to the customer at the server's VPN address.
        let local = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = local.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = local.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = s
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nlocal\n")
                    .await;
            }
        });
        let server_vpn_addr = vpn::VPN_DNS.replace(".2", ".1");
        let here = tokio::process::Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "3",
                &format!("http://{server_vpn_addr}:{port}/"),
            ])
            .output()
            .await
            .unwrap();
        assert_eq!(
            here.stdout, b"local\n",
            "the service answers on the server itself"
        );
        let (ok, _, _) = curl(&topo.cust, &format!("http://{server_vpn_addr}:{port}/"), 3).await;
        assert!(
            !ok,
            "the server's own services are not reachable through the VPN"
        );
        drop(c);

        // Wrong password, unknown user: denied with a reason the client sees.
        let bad = ovpn.replace(&format!("\n{pass}\n"), "\nWrongPassword123\n");
        let c = Client::start(&topo.cust, &v.profile_file("bad.ovpn", &bad));
        assert!(
            c.wait_log("AUTH_FAILED,invalid credentials", CONNECT).await,
            "{}",
            c.log_text()
        );
        drop(c);
        let unknown = bad.replace(&format!("\n{user}\n"), "\npfnobody00000\n");
        let c = Client::start(&topo.cust, &v.profile_file("unknown.ovpn", &unknown));
        assert!(
            c.wait_log("AUTH_FAILED,invalid credentials", CONNECT).await,
            "{}",
            c.log_text()
        );
        drop(c);

        // The downloadable profile has no password: the client asks for it instead of connecting.
        let r =
            v.s.get(
                &format!(
                    "/api/v1.0/connections/{}/profile.ovpn",
                    conn["id"].as_str().unwrap()
                ),
                &v.token,
            )
            .await;
        assert_eq!(r.status(), 200);
        let plain = r.text().await.unwrap();
        assert!(
            !plain.contains(pass),
            "the stored profile never holds the password"
        );
        assert!(plain.contains(&format!("<auth-user-pass>\n{user}\n</auth-user-pass>")));
        let before: Vec<u64> = v.door().sessions.all().iter().map(|s| s.cid).collect();
        let mut c = Client::start(&topo.cust, &v.profile_file("nopass.ovpn", &plain));
        let exited = c.exited(Duration::from_secs(10)).await;
        assert!(!c.log_text().contains("Initialization Sequence Completed"));
        assert!(
            exited || c.log_text().to_lowercase().contains("password"),
            "without a password the client prompts or stops:\n{}",
            c.log_text()
        );
        assert!(
            v.door()
                .sessions
                .all()
                .iter()
                .all(|s| before.contains(&s.cid)),
            "no new session without a password"
        );
        drop(c);

        // The operator's dashboard offers the same profile on the connection's page, and with the password given
        // separately (as the customer's client would ask for it) it connects.
        let id = conn["id"].as_str().unwrap();
        let dash = reqwest::Client::new();
        let cookie = format!("pf_session={}", v.token);
        let get = |path: String| dash.get(v.s.url(&path)).header("cookie", &cookie).send();
        let page = get(format!("/connections/{id}")).await.unwrap();
        assert_eq!(page.status(), 200);
        let page = page.text().await.unwrap();
        assert!(
            page.contains(&format!("href=\"/connections/{id}/profile.ovpn\"")),
            "{page}"
        );
        assert!(page.contains(&format!("{}:{} UDP", vpn::SERVER_CUST, vpn::VPN_PORT)));
        let r = get(format!("/connections/{id}/profile.ovpn"))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-disposition"],
            format!("attachment; filename=\"{user}.ovpn\"").as_str()
        );
        assert_eq!(r.headers()["cache-control"], "no-store");
        let from_dashboard = r.text().await.unwrap();
        assert_eq!(from_dashboard, plain);
        let profile = v.profile_file("dashboard.ovpn", &from_dashboard);
        let creds = v.profile_file("dashboard.pass", &format!("{user}\n{pass}\n"));
        let c = Client::start_with(
            &topo.cust,
            &profile,
            &["--auth-user-pass".as_ref(), creds.as_os_str()],
        );
        assert!(
            c.connected(CONNECT).await,
            "the dashboard's profile connects with the password:\n{}",
            c.log_text()
        );
        let (ok, _, body) = curl(&topo.cust, &format!("http://{TARGET_NAME}/"), 15).await;
        assert!(
            ok && body == HELLO,
            "traffic flows with the dashboard's profile"
        );
        drop(c);
        stop.cancel();
        v.agent_stop.cancel();
        v.s.shutdown().await;
    });
}

/// `ping` from the customer's namespace: whether every one of `count` echoes was answered, and its output.
async fn ping(topo: &Topology, to: &str, count: u32) -> (bool, String) {
    let out = tokio::process::Command::from(topo.cust.command("ping"))
        .args(["-n", "-c", &count.to_string(), "-i", "0.2", "-W", "3", to])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let all = text.contains(&format!("{count} packets transmitted, {count} received"));
    (out.status.success() && all, text)
}

#[test]
fn vpn_ping_is_answered_from_the_device_and_metered() {
    in_server_ns(8, |topo| async move {
        let stop = CancellationToken::new();
        let _target = start_target(&topo.tgt, stop.clone());
        let v = Vpn::start(&topo, RawConfig::default()).await;
        let conn = v.create(None).await;
        let id = conn["id"].as_str().unwrap();
        let c = Client::start(&topo.cust, &v.profile_file("ping.ovpn", &ovpn_of(&conn)));
        assert!(c.connected(CONNECT).await, "{}", c.log_text());
        // The target is reachable from the device's network only: every reply crossed the device.
        let before = v.connection(id).await["used_bytes"].as_u64().unwrap();
        let (ok, out) = ping(&topo, &vpn::TARGET.to_string(), 3).await;
        assert!(ok, "ping through the device:\n{out}");
        let used = v.connection(id).await["used_bytes"].as_u64().unwrap() - before;
        // 3 requests and 3 replies of 64 bytes each (8 of header, ping's 56 of data).
        assert!(used >= 6 * 64, "echoes are metered: {used}");
        // The pushed DNS address answers itself: a customer can check the tunnel without a device round trip.
        let (ok, out) = ping(&topo, vpn::VPN_DNS, 2).await;
        assert!(ok, "ping to the VPN's DNS address:\n{out}");
        // So does the gateway (the server's VPN address), though nothing else of the server is reachable.
        let gateway = vpn::VPN_DNS.replace(".2", ".1");
        let (ok, out) = ping(&topo, &gateway, 2).await;
        assert!(ok, "ping to the VPN's gateway:\n{out}");
        // Nothing is made up: an address the device cannot reach stays silent.
        let (ok, out) = ping(&topo, "10.201.9.9", 2).await;
        assert!(
            !ok && out.contains("2 packets transmitted, 0 received"),
            "{out}"
        );
        drop(c);

        // Echoes count against the limit like datagrams, whole or not at all: with room for three messages of 64
        // bytes, one request and its reply pass, the second request takes the rest, its reply is not delivered,
        // and the connection is exhausted at exactly its limit.
        let small = v.create(Some(3 * 64)).await;
        let sid = small["id"].as_str().unwrap();
        let c = Client::start(
            &topo.cust,
            &v.profile_file("ping-small.ovpn", &ovpn_of(&small)),
        );
        assert!(c.connected(CONNECT).await, "{}", c.log_text());
        let (_, out) = ping(&topo, &vpn::TARGET.to_string(), 3).await;
        assert!(out.contains(", 1 received"), "{out}");
        v.until(
            "the small connection is exhausted",
            Duration::from_secs(5),
            || async { v.connection(sid).await["state"] == "exhausted" },
        )
        .await;
        assert_eq!(v.connection(sid).await["used_bytes"], 3 * 64);
        drop(c);
        stop.cancel();
        v.agent_stop.cancel();
        v.s.shutdown().await;
    });
}

fn ovpn_of(v: &Value) -> String {
    v["ovpn"]
        .as_str()
        .expect("profile in the answer")
        .to_owned()
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn vpn_cut_off_stops_traffic_at_the_limit_and_reset_restores_it() {
    in_server_ns(2, |topo| async move {
        const LIMIT: u64 = 300_000;
        let stop = CancellationToken::new();
        let target = start_target(&topo.tgt, stop.clone());
        let v = Vpn::start(&topo, RawConfig::default()).await;
        let conn = v.create(Some(LIMIT)).await;
        let id = conn["id"].as_str().unwrap().to_owned();
        let profile = v.profile_file("cut.ovpn", &ovpn_of(&conn));
        let mut c = Client::start(&topo.cust, &profile);
        assert!(c.connected(CONNECT).await, "{}", c.log_text());

        // 8 MiB asked for, 300,000 bytes paid for.
        let (_, got, _) = curl(&topo.cust, &format!("http://{TARGET_NAME}/big"), 20).await;
        let sent = target.sent.load(std::sync::atomic::Ordering::Relaxed);
        assert!(sent > LIMIT, "the target kept sending ({sent} bytes)");
        assert!(
            got as u64 <= LIMIT,
            "the customer got {got} bytes, more than the limit"
        );
        assert!(got > 0, "traffic flowed before the cut-off");
        v.until(
            "the connection is exhausted",
            Duration::from_secs(5),
            || async { v.connection(&id).await["state"] == "exhausted" },
        )
        .await;
        let c_view = v.connection(&id).await;
        assert_eq!(
            c_view["used_bytes"].as_u64(),
            Some(LIMIT),
            "exactly the limit was forwarded"
        );
        // The session is killed at once, and a new login is refused until the operator resets.
        assert!(
            c.exited(Duration::from_secs(10)).await,
            "the client was told to stop:\n{}",
            c.log_text()
        );
        drop(c);
        let c = Client::start(&topo.cust, &profile);
        assert!(
            c.wait_log("AUTH_FAILED,bandwidth limit reached", CONNECT)
                .await,
            "{}",
            c.log_text()
        );
        drop(c);
        let r =
            v.s.post(
                &format!("/api/v1.0/connections/{id}/reset-usage"),
                &v.token,
                json!({}),
            )
            .await;
        assert!(r.status().is_success());
        let c = Client::start(&topo.cust, &profile);
        assert!(
            c.connected(CONNECT).await,
            "admitted after the reset:\n{}",
            c.log_text()
        );
        let (ok, _, body) = curl(&topo.cust, &format!("http://{TARGET_NAME}/"), 15).await;
        assert!(ok && body == HELLO, "traffic flows again after the reset");
        drop(c);
        stop.cancel();
        v.agent_stop.cancel();
        v.s.shutdown().await;
    });
}

#[test]
fn vpn_sessions_end_on_newer_login_new_password_disable_and_revocation() {
    in_server_ns(3, |topo| async move {
        let stop = CancellationToken::new();
        let _target = start_target(&topo.tgt, stop.clone());
        let v = Vpn::start(&topo, RawConfig::default()).await;
        let conn = v.create(None).await;
        let id = conn["id"].as_str().unwrap().to_owned();
        let first = v.profile_file("first.ovpn", &ovpn_of(&conn));

        // One live session per connection: a second login replaces the first.
        let mut c1 = Client::start(&topo.cust, &first);
        assert!(c1.connected(CONNECT).await, "{}", c1.log_text());
        let mut c2 = Client::start(&topo.cust, &v.profile_file("second.ovpn", &ovpn_of(&conn)));
        assert!(c2.connected(CONNECT).await, "{}", c2.log_text());
        assert!(
            c1.exited(Duration::from_secs(15)).await,
            "the older session was killed:\n{}",
            c1.log_text()
        );
        assert_eq!(v.door().sessions.len(), 1);

        // A new password ends the session; the old profile is refused; the new one works.
        let r =
            v.s.post(
                &format!("/api/v1.0/connections/{id}/regenerate-password"),
                &v.token,
                json!({}),
            )
            .await;
        assert_eq!(r.status(), 200);
        let regenerated: Value = r.json().await.unwrap();
        assert!(
            c2.exited(Duration::from_secs(10)).await,
            "session with the old password killed"
        );
        let old = Client::start(&topo.cust, &first);
        assert!(
            old.wait_log("AUTH_FAILED,invalid credentials", CONNECT)
                .await,
            "{}",
            old.log_text()
        );
        drop(old);
        let newer = v.profile_file("new.ovpn", &ovpn_of(&regenerated));
        let mut c3 = Client::start(&topo.cust, &newer);
        assert!(c3.connected(CONNECT).await, "{}", c3.log_text());
        // Every login of the connection got the same address.
        let ips: Vec<_> = v.door().sessions.all().iter().map(|s| s.ip).collect();
        assert_eq!(ips, vec![std::net::Ipv4Addr::new(10, 77, 0, 16)]);

        // Disabled: killed, refused with the reason.
        let r =
            v.s.patch(
                &format!("/api/v1.0/connections/{id}"),
                &v.token,
                json!({ "enabled": false }),
            )
            .await;
        assert_eq!(r.status(), 200);
        assert!(
            c3.exited(Duration::from_secs(10)).await,
            "disabled connection's session killed"
        );
        let c = Client::start(&topo.cust, &newer);
        assert!(
            c.wait_log("AUTH_FAILED,connection disabled", CONNECT).await,
            "{}",
            c.log_text()
        );
        drop(c);
        let r =
            v.s.patch(
                &format!("/api/v1.0/connections/{id}"),
                &v.token,
                json!({ "enabled": true }),
            )
            .await;
        assert_eq!(r.status(), 200);

        // Moved to another device that is online: the client is told to log in again, not to quit, and is back
        // by itself, on the new device.
        let (other, _other_agent) = v.add_device(&topo, "phone-2").await;
        let mut c5 = Client::start(&topo.cust, &newer);
        assert!(c5.connected(CONNECT).await, "{}", c5.log_text());
        let r =
            v.s.patch(
                &format!("/api/v1.0/connections/{id}"),
                &v.token,
                json!({ "device_id": other }),
            )
            .await;
        assert_eq!(r.status(), 200);
        v.until("the client to log in again", CONNECT, || async {
            count(&c5.log_text(), "Initialization Sequence Completed") >= 2
        })
        .await;
        assert!(
            !c5.exited(Duration::from_secs(1)).await,
            "{}",
            c5.log_text()
        );
        let (ok, _, body) = curl(&topo.cust, &format!("http://{TARGET_NAME}/"), 15).await;
        assert!(
            ok && body == HELLO,
            "traffic through the new device: {body}"
        );
        drop(c5);
        let r =
            v.s.patch(
                &format!("/api/v1.0/connections/{id}"),
                &v.token,
                json!({ "device_id": v.device_id }),
            )
            .await;
        assert_eq!(r.status(), 200);

        // The device revoked: killed, and refused, saying why.
        let mut c4 = Client::start(&topo.cust, &newer);
        assert!(c4.connected(CONNECT).await, "{}", c4.log_text());
        let r =
            v.s.post(
                &format!("/api/v1.0/devices/{}/revoke", v.device_id),
                &v.token,
                json!({}),
            )
            .await;
        assert!(r.status().is_success());
        assert!(
            c4.exited(Duration::from_secs(10)).await,
            "revoked device's sessions killed"
        );
        let c = Client::start(&topo.cust, &newer);
        assert!(
            c.wait_log("AUTH_FAILED,the connection's device was revoked", CONNECT)
                .await,
            "{}",
            c.log_text()
        );
        drop(c);
        stop.cancel();
        v.agent_stop.cancel();
        v.s.shutdown().await;
    });
}

#[test]
fn vpn_customers_survive_a_management_reconnect_and_come_back_after_an_openvpn_crash() {
    in_server_ns(4, |topo| async move {
        let stop = CancellationToken::new();
        let _target = start_target(&topo.tgt, stop.clone());
        let v = Vpn::start(&topo, RawConfig::default()).await;
        let conn = v.create(None).await;
        let c = Client::start(&topo.cust, &v.profile_file("c.ovpn", &ovpn_of(&conn)));
        assert!(c.connected(CONNECT).await, "{}", c.log_text());
        let url = format!("http://{TARGET_NAME}/");

        // The management socket drops and comes back: the established customer stays and keeps working.
        let cid = v.door().sessions.all()[0].cid;
        v.door().reconnect_management();
        tokio::time::sleep(Duration::from_millis(500)).await;
        v.until(
            "the session is known again",
            Duration::from_secs(5),
            || async { v.door().sessions.all().iter().any(|s| s.cid == cid) },
        )
        .await;
        let (ok, _, body) = curl(&topo.cust, &url, 15).await;
        assert!(
            ok && body == HELLO,
            "traffic flows after the manager reconnected"
        );
        assert_eq!(
            count(&c.log_text(), "Initialization Sequence Completed"),
            1,
            "the client never reconnected"
        );

        // openvpn dies: the supervisor restarts it and the client comes back by itself.
        let pid = v.door().openvpn_pid();
        assert_ne!(pid, 0);
        let killed = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let again = tokio::time::timeout(Duration::from_secs(15), v.door().wait_for_openvpn(pid))
            .await
            .expect("openvpn restarted");
        assert_ne!(again, pid);
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        while count(&c.log_text(), "Initialization Sequence Completed") < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the client reconnected:\n{}",
                c.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (ok, _, body) = curl(&topo.cust, &url, 15).await;
        assert!(ok && body == HELLO, "traffic flows after the restart");
        drop(c);
        stop.cancel();
        v.agent_stop.cancel();
        v.s.shutdown().await;
    });
}

#[test]
fn vpn_fails_closed_when_the_stack_is_gone() {
    in_server_ns(5, |topo| async move {
        let stop = CancellationToken::new();
        let target = start_target(&topo.tgt, stop.clone());
        let v = Vpn::start(&topo, RawConfig::default()).await;
        // Give the server an uplink that could carry a leak all the way: its default route goes to the device's
        // namespace, which forwards, and the target can answer back.
        let run = |ns: &vpn::Netns, args: &[&str]| {
            let st = ns.command(args[0]).args(&args[1..]).status().unwrap();
            assert!(st.success(), "{args:?}");
        };
        run(
            &topo.srv,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &vpn::DEV_UP.to_string(),
            ],
        );
        run(&topo.dev, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        run(
            &topo.dev,
            &[
                "ip",
                "route",
                "add",
                "10.77.0.0/16",
                "via",
                &vpn::SERVER_DEV.to_string(),
            ],
        );
        run(
            &topo.tgt,
            &["ip", "route", "add", "default", "via", &DEV_OUT.to_string()],
        );
        let direct = format!("http://{}/", vpn::TARGET);
        let out = tokio::process::Command::new("curl")
            .args(["-s", "--max-time", "5", &direct])
            .output()
            .await
            .unwrap();
        assert_eq!(
            out.stdout,
            HELLO.as_bytes(),
            "the server's own uplink reaches the target"
        );

        let conn = v.create(None).await;
        let c = Client::start(&topo.cust, &v.profile_file("fc.ovpn", &ovpn_of(&conn)));
        assert!(c.connected(CONNECT).await, "{}", c.log_text());
        let (ok, _, body) = curl(&topo.cust, &direct, 10).await;
        assert!(
            ok && body == HELLO,
            "through the device while the stack is up"
        );
        assert_eq!(
            target.http_peers.lock().unwrap().last(),
            Some(&IpAddr::from(DEV_OUT))
        );
        let peers_before = target.http_peers.lock().unwrap().len();

        // proxyfleet's data path goes away (its tun and its TCP listener, as when proxyfleet dies; the kernel rules
        // stay): nothing leaves by the uplink instead.
        v.door().stop_data_path();
        let tun = format!("/sys/class/net/{}", proxyfleet::openvpn::net::STACK_DEV);
        v.until(
            "the stack's tun is gone",
            Duration::from_secs(5),
            || async { !std::path::Path::new(&tun).exists() },
        )
        .await;
        let (ok, _, _) = curl(&topo.cust, &direct, 4).await;
        assert!(!ok, "no route out for the customer without the stack");
        let peers = target.http_peers.lock().unwrap().clone();
        assert_eq!(
            peers.len(),
            peers_before,
            "nothing reached the target: {peers:?}"
        );
        drop(c);
        stop.cancel();
        v.agent_stop.cancel();
        v.s.shutdown().await;
    });
}

/// Without the `openvpn` program the server still starts, with the door off, and the API says so.
#[tokio::test]
async fn without_openvpn_the_server_starts_with_the_door_off() {
    let raw = RawConfig {
        openvpn_listen: Some("127.0.0.1:0".parse().unwrap()),
        openvpn_binary: Some("/nonexistent/openvpn".into()),
        ..RawConfig::default()
    };
    let s = common::TestServer::start(common::Opts {
        raw,
        ..common::Opts::new(common::Db::Sqlite)
    })
    .await
    .expect("server starts");
    assert!(s.running().state.proxy.openvpn.is_none(), "the door is off");
    let token = s.admin_token().await;
    let v = common::connection_on_new_device(&s, &token, "x").await;
    assert!(v["password"].is_string());
    assert!(v["ovpn"].is_null(), "no profile while the door is off");
    let r = s
        .get(
            &format!(
                "/api/v1.0/connections/{}/profile.ovpn",
                v["id"].as_str().unwrap()
            ),
            &token,
        )
        .await;
    assert_eq!(r.status(), 404);
    assert!(common::error_of(r).await.contains("OpenVPN door is off"));
    s.shutdown().await;
}

#[test]
fn vpn_over_tcp_reaches_the_target_through_the_device() {
    in_server_ns(6, |topo| async move {
        let stop = CancellationToken::new();
        let target = start_target(&topo.tgt, stop.clone());
        let v = Vpn::start(
            &topo,
            RawConfig {
                openvpn_proto: Some("tcp".into()),
                ..RawConfig::default()
            },
        )
        .await;
        let conn = v.create(None).await;
        let ovpn = ovpn_of(&conn);
        assert!(ovpn.contains("proto tcp-client"), "{ovpn}");
        // This customer's machine has IPv6 switched off. OpenVPN cannot put the pushed IPv6 address on its tun
        // and exits; the two lines the README gives for such machines make it connect.
        let off = std::process::Command::new("ip")
            .args(["netns", "exec", &topo.cust.name, "sysctl", "-qw"])
            .args([
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ])
            .status()
            .unwrap();
        assert!(off.success());
        let ovpn = format!("{ovpn}{}", vpn::IPV6_OFF_LINES);
        let c = Client::start(&topo.cust, &v.profile_file("tcp.ovpn", &ovpn));
        assert!(c.connected(CONNECT).await, "{}", c.log_text());
        let (ok, _, body) = curl(&topo.cust, &format!("http://{TARGET_NAME}/"), 15).await;
        assert!(ok && body == HELLO, "through the device over TCP");
        assert_eq!(
            target.http_peers.lock().unwrap().as_slice(),
            &[IpAddr::from(DEV_OUT)]
        );
        drop(c);
        stop.cancel();
        v.agent_stop.cancel();
        v.s.shutdown().await;
    });
}

/// A TLS renegotiation (REAUTH on the management interface) is answered: the session and its traffic carry on.
#[test]
fn vpn_renegotiation_is_reauthenticated_without_dropping_the_session() {
    in_server_ns(7, |topo| async move {
        let stop = CancellationToken::new();
        let _target = start_target(&topo.tgt, stop.clone());
        let v = Vpn::start(&topo, RawConfig::default()).await;
        let conn = v.create(None).await;
        // The client asks for a new key every 3 seconds.
        let ovpn = ovpn_of(&conn).replace("nobind\n", "nobind\nreneg-sec 3\n");
        let c = Client::start(&topo.cust, &v.profile_file("reneg.ovpn", &ovpn));
        assert!(c.connected(CONNECT).await, "{}", c.log_text());
        let cid = v.door().sessions.all()[0].cid;
        assert!(
            c.wait_log("soft reset", Duration::from_secs(15)).await,
            "the client renegotiated:\n{}",
            c.log_text()
        );
        // Give the renegotiation time to finish (or to fail, which would end the session).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (ok, _, body) = curl(&topo.cust, &format!("http://{TARGET_NAME}/"), 15).await;
        assert!(
            ok && body == HELLO,
            "traffic flows after the renegotiation:\n{}",
            c.log_text()
        );
        assert!(!c.log_text().contains("AUTH_FAILED"), "{}", c.log_text());
        assert_eq!(
            v.door()
                .sessions
                .all()
                .iter()
                .map(|s| s.cid)
                .collect::<Vec<_>>(),
            vec![cid],
            "the same session"
        );
        assert_eq!(count(&c.log_text(), "Initialization Sequence Completed"), 1);
        drop(c);
        stop.cancel();
        v.agent_stop.cancel();
        v.s.shutdown().await;
    });
}
