//! Offline alerting: a device is offline when no heartbeat has come for `offline_after`; its offline alert is sent
//! unless one was sent for it within `cooldown` (then it is deferred to the cooldown's end, if the device is still
//! offline); a recovery is sent at once when an alerted device is heard from again.
//!
//! The state lives in the store (`device_alerts`) and every transition is a conditional update written together
//! with its outbox event, so restarts neither lose nor repeat alerts and several server processes send each event
//! once. [`decide`] is the whole rule, as a pure function.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::clock::{rfc3339, Clock};
use crate::store::{new_id, AlertChange, AlertRow, NewEvent, Store, StoreError};
use crate::tunnel::Registry;

#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Silence after which a device is offline, ms.
    pub offline_after: i64,
    /// After an offline alert, no other for the same device for this long, ms.
    pub cooldown: i64,
    /// After startup, nobody is declared offline for this long, ms (devices that were online get this much time to
    /// reconnect to a restarted server).
    pub startup_grace: i64,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            offline_after: 120_000,
            cooldown: 300_000,
            startup_grace: 120_000,
        }
    }
}

/// What to do with one device now, and the event that goes with it.
pub fn decide(
    row: &AlertRow,
    now: i64,
    rules: &Rules,
    offline_possible: bool,
) -> Option<(AlertChange, Option<NewEvent>)> {
    let cooldown_over = row.last_alert_at.is_none_or(|t| now - t >= rules.cooldown);
    match row.offline_since {
        None => {
            let silent = row
                .last_seen_at
                .is_some_and(|ls| now - ls >= rules.offline_after);
            if offline_possible && silent {
                let last_seen = row.last_seen_at.unwrap_or(now);
                let incident = new_id();
                let alert = cooldown_over;
                let event = alert.then(|| offline_event(row, &incident, last_seen, now, rules, 0));
                Some((
                    AlertChange::Offline {
                        offline_since: last_seen,
                        incident_id: incident,
                        alert,
                        now,
                    },
                    event,
                ))
            } else if row.suppressed > 0 && cooldown_over {
                Some((
                    AlertChange::ClearSuppressed {
                        suppressed: row.suppressed,
                        now,
                    },
                    None,
                ))
            } else {
                None
            }
        }
        Some(since) => {
            if row.last_seen_at.is_some_and(|ls| ls > since) {
                let event = row.alerted_at.map(|_| recovered_event(row, since, now));
                Some((
                    AlertChange::Recovered {
                        offline_since: since,
                        now,
                    },
                    event,
                ))
            } else if row.alerted_at.is_none() && row.suppressed > 0 && cooldown_over {
                let incident = row.incident_id.clone().unwrap_or_else(new_id);
                let event = offline_event(row, &incident, since, now, rules, row.suppressed);
                Some((
                    AlertChange::Deferred {
                        suppressed: row.suppressed,
                        last_alert_at: row.last_alert_at.unwrap_or(0),
                        now,
                    },
                    Some(event),
                ))
            } else {
                None
            }
        }
    }
}

fn envelope(row: &AlertRow, event_type: &str, now: i64, data: serde_json::Value) -> NewEvent {
    crate::webhooks::event(&row.operator_id, event_type, now, data)
}

fn offline_event(
    row: &AlertRow,
    incident: &str,
    last_seen: i64,
    now: i64,
    rules: &Rules,
    suppressed: i64,
) -> NewEvent {
    envelope(
        row,
        "device.offline",
        now,
        json!({
            "device": {"id": row.device_id, "name": row.device_name},
            "incident_id": incident,
            "sequence": row.seq + 1,
            "last_seen_at": rfc3339(last_seen),
            "offline_at": rfc3339(last_seen + rules.offline_after),
            "threshold_seconds": rules.offline_after / 1000,
            "deferred": suppressed > 0,
            "suppressed_count": suppressed,
        }),
    )
}

fn recovered_event(row: &AlertRow, since: i64, now: i64) -> NewEvent {
    let back = row.last_seen_at.unwrap_or(now);
    envelope(
        row,
        "device.recovered",
        now,
        json!({
            "device": {"id": row.device_id, "name": row.device_name},
            "incident_id": row.incident_id,
            "sequence": row.seq + 1,
            "last_seen_at": rfc3339(back),
            "offline_since": rfc3339(since),
            "recovered_at": rfc3339(back),
            "downtime_seconds": (back - since) / 1000,
        }),
    )
}

/// What one scan did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanReport {
    pub offline_alerts: usize,
    pub suppressed: usize,
    pub recovered: usize,
    pub deferred: usize,
}

pub struct Detector {
    store: Store,
    clock: Arc<dyn Clock>,
    rules: Rules,
    started_at: i64,
    registry: Option<Arc<Registry>>,
}

impl Detector {
    pub fn new(
        store: Store,
        clock: Arc<dyn Clock>,
        rules: Rules,
        registry: Option<Arc<Registry>>,
    ) -> Self {
        Detector {
            started_at: clock.now_ms(),
            store,
            clock,
            rules,
            registry,
        }
    }

    /// Judge every device once.
    pub async fn scan(&self) -> Result<ScanReport, StoreError> {
        let now = self.clock.now_ms();
        if let Some(r) = &self.registry {
            // This process's heartbeats first, so that nobody it hears from is judged on stale times.
            self.store.record_seen(&r.take_seen(now)).await?;
        }
        match self.store.ensure_alert_rows(now).await {
            Err(e) if !e.is_contention() => return Err(e),
            _ => {}
        }
        let offline_possible = now - self.started_at >= self.rules.startup_grace;
        let rows = self
            .store
            .alert_candidates(
                now - self.rules.offline_after,
                offline_possible,
                now - self.rules.cooldown,
            )
            .await?;
        let mut report = ScanReport::default();
        for row in rows {
            let Some((change, event)) = decide(&row, now, &self.rules, offline_possible) else {
                continue;
            };
            match self
                .store
                .apply_alert_change(&row.device_id, &change, event.as_ref())
                .await
            {
                Ok(true) => {}
                // Another process made this transition, or is making it right now (the next scan sees which).
                Ok(false) => continue,
                Err(e) if e.is_contention() => continue,
                Err(e) => return Err(e),
            }
            match change {
                AlertChange::Offline { alert: true, .. } => report.offline_alerts += 1,
                AlertChange::Offline { alert: false, .. } => report.suppressed += 1,
                AlertChange::Recovered { .. } => report.recovered += 1,
                AlertChange::Deferred { .. } => report.deferred += 1,
                AlertChange::ClearSuppressed { .. } => {}
            }
        }
        if let Some(r) = &self.registry {
            r.watch_offline(self.store.offline_device_ids().await?);
        }
        Ok(report)
    }
}

/// Scan every `interval`, and at once when an offline device is heard from, until cancelled.
pub async fn run(
    detector: Detector,
    interval: Duration,
    wake: Arc<tokio::sync::Notify>,
    events: Arc<tokio::sync::Notify>,
    cancel: CancellationToken,
) {
    loop {
        match detector.scan().await {
            Ok(r) => {
                if r != ScanReport::default() {
                    tracing::info!(
                        offline = r.offline_alerts,
                        suppressed = r.suppressed,
                        recovered = r.recovered,
                        deferred = r.deferred,
                        "device alert transitions"
                    );
                    events.notify_one();
                }
            }
            Err(e) => tracing::warn!(error = %e, "offline detection scan failed"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(last_seen: i64) -> AlertRow {
        AlertRow {
            device_id: "d".into(),
            operator_id: "o".into(),
            device_name: "phone".into(),
            last_seen_at: Some(last_seen),
            offline_since: None,
            incident_id: None,
            alerted_at: None,
            last_alert_at: None,
            suppressed: 0,
            seq: 0,
        }
    }

    #[test]
    fn offline_at_exactly_the_threshold() {
        let r = Rules::default();
        assert!(decide(&row(0), 119_999, &r, true).is_none());
        let (c, e) = decide(&row(0), 120_000, &r, true).unwrap();
        assert!(matches!(
            c,
            AlertChange::Offline {
                alert: true,
                offline_since: 0,
                ..
            }
        ));
        let e = e.unwrap();
        let v: serde_json::Value = serde_json::from_str(&e.payload).unwrap();
        assert_eq!(v["type"], "device.offline");
        assert_eq!(v["id"], e.id.as_str());
        assert_eq!(v["data"]["threshold_seconds"], 120);
        assert_eq!(v["data"]["sequence"], 1);
        assert!(e.payload.len() < 20_000);
        // Never during the startup grace.
        assert!(decide(&row(0), 500_000, &r, false).is_none());
    }

    #[test]
    fn cooldown_suppresses_then_defers_or_forgets() {
        let r = Rules::default();
        let mut x = row(0);
        x.last_alert_at = Some(100_000);
        let (c, e) = decide(&x, 200_000, &r, true).unwrap();
        assert!(matches!(c, AlertChange::Offline { alert: false, .. }) && e.is_none());
        // Still offline when the cooldown ends: one deferred alert with the count.
        x.offline_since = Some(0);
        x.incident_id = Some("i".into());
        x.suppressed = 2;
        assert!(decide(&x, 399_999, &r, true).is_none());
        let (c, e) = decide(&x, 400_000, &r, true).unwrap();
        assert!(matches!(c, AlertChange::Deferred { suppressed: 2, .. }));
        let v: serde_json::Value = serde_json::from_str(&e.unwrap().payload).unwrap();
        assert_eq!(
            (
                v["data"]["suppressed_count"].as_i64(),
                v["data"]["incident_id"].as_str()
            ),
            (Some(2), Some("i"))
        );
        // Back online before the end: the recovery of an unalerted incident sends nothing; the count is then cleared.
        x.last_seen_at = Some(300_000);
        let (c, e) = decide(&x, 300_001, &r, true).unwrap();
        assert!(matches!(c, AlertChange::Recovered { .. }) && e.is_none());
        x.offline_since = None;
        let (c, _) = decide(&x, 400_000, &r, true).unwrap();
        assert!(matches!(
            c,
            AlertChange::ClearSuppressed { suppressed: 2, .. }
        ));
    }

    #[test]
    fn recovery_of_an_alerted_device_is_sent_even_in_the_cooldown() {
        let r = Rules::default();
        let mut x = row(250_000);
        x.offline_since = Some(10_000);
        x.alerted_at = Some(130_000);
        x.last_alert_at = Some(130_000);
        x.incident_id = Some("inc".into());
        x.seq = 1;
        let (c, e) = decide(&x, 250_001, &r, true).unwrap();
        assert!(matches!(
            c,
            AlertChange::Recovered {
                offline_since: 10_000,
                ..
            }
        ));
        let v: serde_json::Value = serde_json::from_str(&e.unwrap().payload).unwrap();
        assert_eq!(v["type"], "device.recovered");
        assert_eq!(v["data"]["downtime_seconds"], 240);
        assert_eq!(v["data"]["incident_id"], "inc");
        assert_eq!(v["data"]["sequence"], 2);
    }
}
