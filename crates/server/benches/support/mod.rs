//! Helpers every benchmark uses: settings from the environment, free ports, a process's memory and CPU from /proc.
// Each benchmark compiles this module on its own and uses only some of it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

/// A number from the environment, or `default` when unset or unreadable.
pub fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A loopback port nothing listens on, for a process the benchmark starts. It comes from below Linux's ephemeral
/// range (32768–60999 by default), which port 0 would pick from: there, the benchmark's own outgoing connections
/// take source ports, and one could take the port between this check and the process binding it (session 13 lost
/// a run to that).
pub fn free_port() -> u16 {
    use rand::Rng as _;
    let mut rng = rand::rng();
    loop {
        let port = rng.random_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
}

/// Resident memory of a process, bytes.
pub fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    kb * 1024
}

/// User + system CPU time of a process, seconds (0 once it is gone).
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let f: Vec<&str> = s[s.rfind(')').unwrap() + 2..].split_whitespace().collect();
    // utime and stime, in ticks of USER_HZ (100 on Linux).
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) as f64 / 100.0
}
