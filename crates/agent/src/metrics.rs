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

/// Collect what is available on this device.
pub async fn collect(power_supply_dir: &Path) -> DeviceMetrics {
    let (battery_percent, charging) = battery(power_supply_dir);
    DeviceMetrics {
        battery_percent,
        charging,
        ..DeviceMetrics::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
