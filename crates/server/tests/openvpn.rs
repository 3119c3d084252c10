//! The OpenVPN door end to end, with the real `openvpn` server and clients in network namespaces made by the test
//! (see `vpn/mod.rs` for the topology). Needs root; skips with a printed reason otherwise (`.ci/run` runs as root
//! and requires it).

mod common;
mod vpn;

use std::net::IpAddr;
use std::time::Duration;

use proxyfleet::config::RawConfig;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use vpn::{curl, start_target, Client, Topology, Vpn, BIG, DEV_OUT, HELLO, TARGET_NAME};

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

#[test]
fn vpn_customer_browses_through_the_device_and_dns_is_answered_there() {
    in_server_ns(1, |topo| async move {
        let stop = CancellationToken::new();
        let target = start_target(&topo.tgt, stop.clone());
        let v = Vpn::start(&topo, RawConfig::default()).await;
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

        let mut c = Client::start(&topo.cust, &v.profile_file("c1.ovpn", ovpn));
        assert!(
            c.connected(CONNECT).await,
            "client connects:\n{}",
            c.log_text()
        );
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
        let used = v.connection(conn["id"].as_str().unwrap()).await["used_bytes"]
            .as_u64()
            .unwrap();
        assert!(used > HELLO.len() as u64, "VPN traffic is metered: {used}");
        // The customer's own network: the server's services are not reachable over the VPN.
        let (ok, _, _) = curl(
            &topo.cust,
            &format!("http://{}/healthz", vpn::VPN_DNS.replace(".2", ".1")),
            3,
        )
        .await;
        assert!(
            !ok,
            "the server's own address is not reachable through the VPN"
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
        stop.cancel();
        v.agent_stop.cancel();
        v.s.shutdown().await;
        let _ = BIG;
    });
}
