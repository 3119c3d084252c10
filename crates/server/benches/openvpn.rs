//! The OpenVPN door's data path, side by side with the same OpenVPN server doing plain kernel forwarding and NAT
//! (no proxyfleet): one TCP flow's upload and download throughput (iperf3), `ping` round trips to the target, and
//! the time from starting an `openvpn` client to the first byte through the device. Runs in network namespaces (the tests' topology: customer, server,
//! device, target); needs root, `openvpn`, `nft` and `iperf3` (`bench/openvpn.sh` installs them).
//!
//! Settings: `BENCH_SECS` (iperf3 duration per direction, default 10), `BENCH_TTFB_RUNS` (default 5),
//! `BENCH_PINGS` (echo requests per path, default 100).
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/vpn/mod.rs"]
mod vpn;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proxyfleet::config::RawConfig;
use tokio_util::sync::CancellationToken;
use vpn::{Client, Netns, Topology, Vpn, DEV_UP, TARGET};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sh(ns: &Netns, args: &[&str]) {
    let st = ns.command(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?} in {}", ns.name);
}

/// One iperf3 run from the customer to the target; Mbit/s received.
fn iperf(cust: &Netns, secs: u64, reverse: bool) -> f64 {
    let mut c = cust.command("iperf3");
    c.args(["-c", &TARGET.to_string(), "-J", "-t", &secs.to_string()]);
    if reverse {
        c.arg("-R");
    }
    let out = c.output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 failed: {}", String::from_utf8_lossy(&out.stdout)));
    bps / 1e6
}

/// `count` pings from the customer to the target, 20 a second: round-trip (min, avg, max) in ms and how many were
/// answered.
fn ping_rtt(cust: &Netns, count: u64) -> ((f64, f64, f64), u64) {
    let out = cust
        .command("ping")
        .args([
            "-n",
            "-q",
            "-i",
            "0.05",
            "-W",
            "2",
            "-c",
            &count.to_string(),
            &TARGET.to_string(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let received = text
        .split(", ")
        .find_map(|p| p.strip_suffix(" received"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let rtt: Vec<f64> = text
        .lines()
        .find_map(|l| l.split(" = ").nth(1))
        .map(|v| {
            v.trim_end_matches(" ms")
                .split('/')
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(rtt.len() >= 3, "ping gave no round trips:\n{text}");
    ((rtt[0], rtt[1], rtt[2]), received)
}

/// Start `client`, then fetch from the target until a byte arrives: seconds from start to first byte.
async fn time_to_first_byte(cust: &Netns, profile: &std::path::Path) -> (f64, Client) {
    let t0 = Instant::now();
    let c = Client::start(cust, profile);
    let url = format!("http://{TARGET}/");
    loop {
        let out = tokio::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &cust.name,
                "curl",
                "-s",
                "--max-time",
                "1",
                &url,
            ])
            .output()
            .await
            .unwrap();
        if !out.stdout.is_empty() {
            return (t0.elapsed().as_secs_f64(), c);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no byte in 60 s:\n{}",
            c.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The baseline: the same keys and client profile against a second OpenVPN server that forwards in the kernel and
/// NATs out of the server's uplink (the device namespace), which NATs again towards the target.
fn start_baseline(
    topo: &Topology,
    keys: &std::path::Path,
    work: &std::path::Path,
) -> std::process::Child {
    sh(
        &topo.srv,
        &[
            "ip",
            "route",
            "replace",
            "default",
            "via",
            &DEV_UP.to_string(),
        ],
    );
    sh(&topo.srv, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    sh(&topo.dev, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let nat = |ns: &Netns, out: &str| {
        // Masquerade out of `out`, and never forward what arrives from the customer's own link (only what comes
        // out of the VPN may be forwarded).
        let rules = format!(
            "table ip benchnat {{\n chain post {{\n  type nat hook postrouting priority 100;\n  oifname \"{out}\" masquerade\n }}\n \
             chain guard {{\n  type filter hook forward priority 0;\n  iifname \"eth-cust\" drop\n }}\n}}\n"
        );
        let mut c = ns
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
        assert!(c.wait().unwrap().success());
    };
    nat(&topo.srv, "eth-dev");
    nat(&topo.dev, "eth-tgt");
    let conf = work.join("baseline.conf");
    std::fs::write(
        &conf,
        format!(
            "port 1195\nproto udp\nlocal {ip}\ndev pfbase0\ndev-type tun\ntopology subnet\nserver 10.78.0.0 255.255.0.0\n\
             verify-client-cert none\nusername-as-common-name\nscript-security 2\nauth-user-pass-verify /bin/true via-env\n\
             ca {k}/ca.pem\ncert {k}/server.pem\nkey {k}/server.key\ndh none\ntls-crypt {k}/tls-crypt.key\n\
             data-ciphers AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305\npush \"redirect-gateway def1\"\npush \"block-ipv6\"\n\
             keepalive 10 30\ntxqueuelen 1000\nverb 1\nexplicit-exit-notify 1\n",
            ip = vpn::SERVER_CUST,
            k = keys.display()
        ),
    )
    .unwrap();
    Command::new("openvpn")
        .arg("--config")
        .arg(&conf)
        .arg("--log")
        .arg(work.join("baseline.log"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn main() {
    let Some(topo) = Topology::create(9) else {
        println!("openvpn bench skipped (see the reason above)");
        return;
    };
    if Command::new("iperf3").arg("--version").output().is_err() {
        println!("openvpn bench skipped: iperf3 is not installed (bench/openvpn.sh installs it)");
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,proxyfleet::openvpn=info".into()),
        )
        .try_init();
    let secs = env_u64("BENCH_SECS", 10);
    let runs = env_u64("BENCH_TTFB_RUNS", 5);
    let pings = env_u64("BENCH_PINGS", 100);
    topo.srv.enter();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let stop = CancellationToken::new();
        let _target = vpn::start_target(&topo.tgt, stop.clone());
        let mut iperf_server = topo
            .tgt
            .command("iperf3")
            .args(["-s", "-B", &TARGET.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let v = Vpn::start(
            &topo,
            RawConfig {
                log_level: Some("warn".into()),
                ..RawConfig::default()
            },
        )
        .await;
        let conn = v.create(None).await;
        let ovpn = conn["ovpn"].as_str().unwrap().to_owned();
        let profile = v.profile_file("bench.ovpn", &ovpn);

        // Time to first byte: client start → first byte of the target's answer, through the device.
        let mut ttfb = Vec::new();
        for _ in 0..runs {
            // The next login replaces this session at once (the older one is killed), so no wait is needed.
            let (t, c) = time_to_first_byte(&topo.cust, &profile).await;
            ttfb.push(t);
            drop(c);
        }

        let c = Client::start(&topo.cust, &profile);
        assert!(c.connected(Duration::from_secs(20)).await, "{}", c.log_text());
        let pf_up = iperf(&topo.cust, secs, false);
        let pf_down = iperf(&topo.cust, secs, true);
        let pf_ping = ping_rtt(&topo.cust, pings);
        drop(c);

        let keys = v.s.data_dir.path().join("openvpn");
        let mut base = start_baseline(&topo, &keys, v.work.path());
        let base_profile = v.profile_file(
            "baseline.ovpn",
            &ovpn.replace(&format!("remote {} 1194", vpn::SERVER_CUST), &format!("remote {} 1195", vpn::SERVER_CUST)),
        );
        let leak = topo
            .cust
            .command("curl")
            .args(["-s", "--max-time", "2", &format!("http://{TARGET}/")])
            .output()
            .unwrap();
        assert!(
            leak.stdout.is_empty(),
            "without a VPN the customer must not reach the target"
        );
        let mut base_ttfb = Vec::new();
        for _ in 0..runs {
            let (t, c) = time_to_first_byte(&topo.cust, &base_profile).await;
            base_ttfb.push(t);
            drop(c);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let c = Client::start(&topo.cust, &base_profile);
        assert!(c.connected(Duration::from_secs(20)).await, "{}", c.log_text());
        let base_up = iperf(&topo.cust, secs, false);
        let base_down = iperf(&topo.cust, secs, true);
        let base_ping = ping_rtt(&topo.cust, pings);
        drop(c);
        let _ = base.kill();
        let _ = base.wait();
        let _ = iperf_server.kill();
        let _ = iperf_server.wait();

        println!("\nOpenVPN door, one TCP flow (iperf3, {secs} s per direction), customer → server → device → target:");
        println!("| path | upload Mbit/s | download Mbit/s |");
        println!("|---|---|---|");
        println!("| OpenVPN + kernel forwarding/NAT (baseline) | {base_up:.0} | {base_down:.0} |");
        println!("| OpenVPN + proxyfleet (TPROXY, relay and meter, QUIC to the agent) | {pf_up:.0} | {pf_down:.0} |");
        println!(
            "| proxyfleet ÷ baseline | {:.0} % | {:.0} % |",
            100.0 * pf_up / base_up,
            100.0 * pf_down / base_down
        );
        let fmt = |v: &[f64]| {
            let mut s = v.to_vec();
            s.sort_by(|a, b| a.total_cmp(b));
            format!("median {:.2} s, min {:.2} s, max {:.2} s", median(v.to_vec()), s[0], s[s.len() - 1])
        };
        let row = |name: &str, ((min, avg, max), got): ((f64, f64, f64), u64)| {
            println!("| {name} | {min:.3} | {avg:.3} | {max:.3} | {got} / {pings} |");
        };
        println!("\n`ping` to the target through the VPN ({pings} echoes, 20 a second):");
        println!("| path | min ms | avg ms | max ms | answered |");
        println!("|---|---|---|---|---|");
        row("baseline (kernel forwarding)", base_ping);
        row("proxyfleet (pinged from the device)", pf_ping);
        println!("\nTime from `openvpn` client start to the first byte through the device ({runs} runs):");
        println!("  proxyfleet: {}", fmt(&ttfb));
        println!("  baseline:   {}", fmt(&base_ttfb));
        stop.cancel();
        v.agent_stop.cancel();
        v.s.shutdown().await;
    });
}
