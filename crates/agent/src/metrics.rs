//! What the device can tell about itself, read fresh for each heartbeat. Everything is optional: a missing file or
//! tool simply leaves the field empty, and nothing here can fail the agent.

use std::path::Path;

use proxyfleet_proto::DeviceMetrics;

/// Read battery state from `power_supply_dir` (normally `/sys/class/power_supply`).
pub fn battery(power_supply_dir: &Path) -> (Option<u8>, Option<bool>) {
    let Ok(entries) = std::fs::read_dir(power_supply_dir) else {
        return (None, None);
    };
    for e in entries.flatten() {
        let p = e.path();
        let kind = std::fs::read_to_string(p.join("type")).unwrap_or_default();
        if kind.trim() != "Battery" {
            continue;
        }
        let capacity = std::fs::read_to_string(p.join("capacity"))
            .ok()
            .and_then(|s| s.trim().parse::<u8>().ok())
            .map(|v| v.min(100));
        let charging = std::fs::read_to_string(p.join("status")).ok().map(|s| {
            let s = s.trim();
            s == "Charging" || s == "Full"
        });
        return (capacity, charging);
    }
    (None, None)
}

/// Signal quality, carrier and access technology from `mmcli -m any -J` (ModemManager's JSON output).
pub fn parse_mmcli(json: &str) -> (Option<u8>, Option<String>, Option<String>) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return (None, None, None);
    };
    let modem = &v["modem"];
    let signal = modem["generic"]["signal-quality"]["value"]
        .as_str()
        .and_then(|s| s.trim().parse::<u8>().ok())
        .map(|v| v.min(100));
    let text = |x: &serde_json::Value| {
        x.as_str()
            .map(str::trim)
            .filter(|s| !s.is_empty() && *s != "--")
            .map(str::to_owned)
    };
    let carrier = text(&modem["3gpp"]["operator-name"]);
    let network = modem["generic"]["access-technologies"]
        .as_array()
        .and_then(|a| a.first())
        .and_then(text);
    (signal, carrier, network)
}

/// Ask ModemManager, if it is installed; nothing when it is not or does not answer within 5 s.
async fn modem() -> (Option<u8>, Option<String>, Option<String>) {
    let run = tokio::process::Command::new("mmcli")
        .args(["-m", "any", "-J"])
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(std::time::Duration::from_secs(5), run).await {
        Ok(Ok(out)) if out.status.success() => parse_mmcli(&String::from_utf8_lossy(&out.stdout)),
        _ => (None, None, None),
    }
}

/// Collect what is available on this device.
pub async fn collect(power_supply_dir: &Path) -> DeviceMetrics {
    let (battery_percent, charging) = battery(power_supply_dir);
    let (signal_percent, carrier, network_type) = modem().await;
    DeviceMetrics {
        battery_percent,
        charging,
        signal_percent,
        carrier,
        network_type,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_modemmanager_json_and_tolerates_garbage() {
        let json = r#"{"modem":{"3gpp":{"operator-name":"Vodafone DE","registration-state":"home"},
            "generic":{"access-technologies":["lte"],"signal-quality":{"recent":"yes","value":"67"}}}}"#;
        assert_eq!(
            parse_mmcli(json),
            (Some(67), Some("Vodafone DE".into()), Some("lte".into()))
        );
        let sparse = r#"{"modem":{"3gpp":{"operator-name":"--"},"generic":{"access-technologies":[],"signal-quality":{"value":"x"}}}}"#;
        assert_eq!(parse_mmcli(sparse), (None, None, None));
        assert_eq!(parse_mmcli("not json"), (None, None, None));
    }

    #[test]
    fn reads_a_sysfs_battery_and_tolerates_absence() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(battery(&dir.path().join("missing")), (None, None));
        let ac = dir.path().join("AC");
        std::fs::create_dir(&ac).unwrap();
        std::fs::write(ac.join("type"), "Mains\n").unwrap();
        assert_eq!(battery(dir.path()), (None, None));
        let bat = dir.path().join("BAT0");
        std::fs::create_dir(&bat).unwrap();
        std::fs::write(bat.join("type"), "Battery\n").unwrap();
        std::fs::write(bat.join("capacity"), "87\n").unwrap();
        std::fs::write(bat.join("status"), "Discharging\n").unwrap();
        assert_eq!(battery(dir.path()), (Some(87), Some(false)));
    }
}
