//! The kernel side of the OpenVPN door: the tun device OpenVPN serves, the policy route that sends everything
//! customers send into proxyfleet's own tun, and the nftables rules that keep it there.
//!
//! Fail closed, three ways: (1) every packet arriving from OpenVPN's tun is looked up in table [`TABLE`] only, whose
//! routes are proxyfleet's tun and, behind it, a blackhole (when proxyfleet's tun is gone — proxyfleet stopped or
//! crashed — the blackhole is all that is left); (2) the forward hook drops anything from OpenVPN's tun that would
//! leave by another interface; (3) the input hook drops anything from OpenVPN's tun addressed to the server itself,
//! so customers never reach the server's own services (API, database, SSH) over the VPN.

use std::process::Stdio;

use tokio::process::Command;

use super::child::VPN_DEV;

/// Name of proxyfleet's tun device, where customer packets are terminated by the userspace stack.
pub const STACK_DEV: &str = "pfnet0";
/// Routing table (and rule preference) of the policy route.
pub const TABLE: u32 = 7701;
/// nftables table holding the door's filter rules.
const NFT_TABLE: &str = "proxyfleet_vpn";
/// Packet mark of customers' TCP that TPROXY handed to proxyfleet's listener, and the routing table (and rule
/// preference) that delivers such packets locally.
pub const TPROXY_MARK: u32 = 7702;
/// Preference of the rule for marked packets: before the policy route's (7701), which would send them to the stack.
const TPROXY_PREF: u32 = 7700;

#[derive(Debug, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct NetError {
    what: String,
    detail: String,
}

async fn run(program: &str, args: &[&str]) -> Result<(), NetError> {
    exec(program, args, None).await
}

async fn input(program: &str, args: &[&str], stdin: &str) -> Result<(), NetError> {
    exec(program, args, Some(stdin)).await
}

/// Run a command to completion; its standard error is the error's detail.
async fn exec(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), NetError> {
    use tokio::io::AsyncWriteExt;
    let err = |detail: String| NetError {
        what: format!("{program} {}", args.join(" ")),
        detail,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        let _ = w.write_all(text.as_bytes()).await;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| err(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(err(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

fn sysctl(path: &str, value: &str) -> Result<(), NetError> {
    std::fs::write(path, value).map_err(|e| NetError {
        what: format!("writing {path}"),
        detail: e.to_string(),
    })
}

/// The nftables rules, replaced as a whole (`nft -f` applies a file atomically). Customers' TCP goes to the
/// transparent listener on `tproxy_port` (if nothing listens there, the rule does not match and the packet takes
/// the policy route, to the stack or the blackhole); only packets TPROXY marked, and echo requests to the server's
/// VPN address `gateway` (so customers can ping their gateway; the kernel answers), may be delivered locally.
fn ruleset(tproxy_port: u16, gateway: std::net::Ipv4Addr) -> String {
    format!(
        "table inet {NFT_TABLE}\n\
         delete table inet {NFT_TABLE}\n\
         table inet {NFT_TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority mangle; policy accept;\n\
         \t\tiifname \"{VPN_DEV}\" meta l4proto tcp tproxy ip to 127.0.0.1:{tproxy_port} meta mark set {TPROXY_MARK} accept\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority -10; policy accept;\n\
         \t\tiifname \"{VPN_DEV}\" meta mark {TPROXY_MARK} meta l4proto tcp accept\n\
         \t\tiifname \"{VPN_DEV}\" ip daddr {gateway} icmp type echo-request accept\n\
         \t\tiifname \"{VPN_DEV}\" drop\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority -10; policy accept;\n\
         \t\tiifname \"{VPN_DEV}\" oifname != \"{STACK_DEV}\" drop\n\
         \t}}\n\
         }}\n"
    )
}

/// Make sure OpenVPN's tun may carry IPv6 (a host whose new interfaces start with IPv6 off would make OpenVPN
/// exit when it adds the tun's IPv6 address). False when the host has IPv6 off altogether.
pub fn enable_ipv6() -> bool {
    let all = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6");
    if all.map(|v| v.trim() != "0").unwrap_or(true) {
        return false;
    }
    let dev = format!("/proc/sys/net/ipv6/conf/{VPN_DEV}/disable_ipv6");
    match std::fs::read_to_string(&dev) {
        Ok(v) if v.trim() == "0" => true,
        Ok(_) => std::fs::write(&dev, "0").is_ok(),
        Err(_) => false,
    }
}

/// Create OpenVPN's tun device (so that forwarding can be switched on for it before OpenVPN starts, and so that it
/// outlives OpenVPN restarts) and the rules that send its packets to proxyfleet only.
pub async fn setup(tproxy_port: u16, gateway: std::net::Ipv4Addr) -> Result<(), NetError> {
    // Leftovers from a run that did not clean up are replaced.
    teardown().await;
    run("ip", &["tuntap", "add", "dev", VPN_DEV, "mode", "tun"]).await?;
    input("nft", &["-f", "-"], &ruleset(tproxy_port, gateway)).await?;
    let (mark, local, pref) = (
        TPROXY_MARK.to_string(),
        TPROXY_MARK.to_string(),
        TPROXY_PREF.to_string(),
    );
    run(
        "ip",
        &[
            "route",
            "replace",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            &local,
        ],
    )
    .await?;
    run(
        "ip",
        &[
            "rule", "add", "fwmark", &mark, "lookup", &local, "pref", &pref,
        ],
    )
    .await?;
    let table = TABLE.to_string();
    run(
        "ip",
        &[
            "route",
            "replace",
            "blackhole",
            "default",
            "table",
            &table,
            "metric",
            "4000",
        ],
    )
    .await?;
    run(
        "ip",
        &[
            "rule", "add", "iif", VPN_DEV, "lookup", &table, "pref", &table,
        ],
    )
    .await?;
    // Forwarding is decided by the interface a packet arrives on: only OpenVPN's and proxyfleet's tun forward.
    sysctl(
        &format!("/proc/sys/net/ipv4/conf/{VPN_DEV}/forwarding"),
        "1",
    )?;
    let strict = std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter")
        .is_ok_and(|v| v.trim() == "1");
    if strict {
        tracing::warn!(
            "net.ipv4.conf.all.rp_filter is 1 (strict): answers from targets arriving on {STACK_DEV} will be \
             dropped; set it to 2 (loose) or 0"
        );
    }
    Ok(())
}

/// After proxyfleet's tun is up: route customer packets into it and let it forward answers back.
pub async fn attach_stack() -> Result<(), NetError> {
    let mtu = super::engine::MTU.to_string();
    run("ip", &["link", "set", "dev", STACK_DEV, "mtu", &mtu, "up"]).await?;
    sysctl(
        &format!("/proc/sys/net/ipv4/conf/{STACK_DEV}/forwarding"),
        "1",
    )?;
    sysctl(
        &format!("/proc/sys/net/ipv4/conf/{STACK_DEV}/rp_filter"),
        "0",
    )?;
    sysctl(
        &format!("/proc/sys/net/ipv4/conf/{STACK_DEV}/accept_local"),
        "1",
    )?;
    run(
        "ip",
        &[
            "route",
            "replace",
            "default",
            "dev",
            STACK_DEV,
            "table",
            &TABLE.to_string(),
            "metric",
            "1",
        ],
    )
    .await
}

/// Remove everything [`setup`] made. Errors are ignored: parts may not exist.
pub async fn teardown() {
    for (pref, table) in [(TABLE, TABLE), (TPROXY_PREF, TPROXY_MARK)] {
        let _ = run("ip", &["rule", "del", "pref", &pref.to_string()]).await;
        let _ = run("ip", &["route", "flush", "table", &table.to_string()]).await;
    }
    let _ = run("nft", &["delete", "table", "inet", NFT_TABLE]).await;
    let _ = run("ip", &["tuntap", "del", "dev", VPN_DEV, "mode", "tun"]).await;
}

/// Whether the programs and privileges the door needs are there; the reason when not.
pub fn check_prerequisites() -> Result<(), String> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err("/dev/net/tun is missing".into());
    }
    for p in ["ip", "nft"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file()));
        if !found {
            return Err(format!(
                "the {p} program is not installed (Debian: {})",
                if p == "ip" { "iproute2" } else { "nftables" }
            ));
        }
    }
    Ok(())
}
