//! The connection form (create and edit): name, device picker, bandwidth limit in MB or GB (empty: unlimited),
//! enabled; and turning a submitted form into the API's JSON, with errors tied to their fields.

use maud::{html, Markup};
use serde_json::{json, Value};

use super::client::Reply;
use super::format::{limit_field, parse_limit};
use super::layout::{csrf, Notes};
use super::session::{Fields, Op};

/// What the form shows: a connection's current settings or what the operator just typed.
pub struct FormValues {
    pub name: String,
    pub device_id: String,
    pub limit: String,
    pub unit: String,
    pub enabled: bool,
}

impl FormValues {
    pub fn blank() -> FormValues {
        FormValues {
            name: String::new(),
            device_id: String::new(),
            limit: String::new(),
            unit: "GB".into(),
            enabled: true,
        }
    }

    /// From a connection as the API shows it.
    pub fn of(c: &Value) -> FormValues {
        let (limit, unit) = limit_field(c["bandwidth_limit_bytes"].as_u64());
        FormValues {
            name: c["name"].as_str().unwrap_or("").to_owned(),
            device_id: c["device_id"].as_str().unwrap_or("").to_owned(),
            limit,
            unit: unit.to_owned(),
            enabled: c["enabled"].as_bool().unwrap_or(true),
        }
    }

    pub fn submitted(f: &Fields) -> FormValues {
        FormValues {
            name: f.get("name").to_owned(),
            device_id: f.get("device_id").to_owned(),
            limit: f.get("limit").to_owned(),
            unit: f.get("unit").to_owned(),
            enabled: f.checked("enabled"),
        }
    }

    /// The API body, or the notes that say which fields are wrong.
    pub fn to_json(&self) -> Result<Value, Notes> {
        let mut notes = Notes::default();
        if self.device_id.is_empty() {
            notes.push_error(
                "f-device",
                "Choose the device this connection's traffic leaves through.",
            );
        }
        let limit = parse_limit(&self.limit, &self.unit)
            .map_err(|e| notes.push_error("f-limit", e))
            .ok();
        match limit {
            Some(limit) if notes.is_empty() => Ok(json!({
                "name": self.name,
                "device_id": self.device_id,
                "bandwidth_limit_bytes": limit,
                "enabled": self.enabled,
            })),
            _ => Err(notes),
        }
    }
}

/// The API's refusal of a form, next to the field it is about.
pub fn api_notes(r: &Reply) -> Notes {
    let e = r.error();
    let lower = e.to_lowercase();
    // (The data-plane refusal names devices, but is about the whole form.)
    let key = if r.body["error"].as_str() == Some(crate::api::ELSEWHERE) {
        "f-form"
    } else if lower.starts_with("name") {
        "f-name"
    } else if lower.contains("device") {
        "f-device"
    } else if lower.contains("bandwidth") || lower.contains("limit") {
        "f-limit"
    } else {
        "f-form"
    };
    Notes::error(key, e)
}

/// The form. `devices` is the API's device list; revoked devices cannot be chosen (but a connection keeps its own).
pub fn render(
    op: &Op,
    action: &str,
    submit: &str,
    v: &FormValues,
    devices: &[Value],
    notes: &Notes,
) -> Markup {
    let aria = |key: &str| notes.described(key);
    let (name_d, name_i) = aria("f-name");
    let (dev_d, dev_i) = aria("f-device");
    let (lim_d, lim_i) = aria("f-limit");
    html! {
        form.conn-form method="post" action=(action) novalidate {
            (csrf(op))
            label for="f-name" { "Name" }
            input id="f-name" name="name" required maxlength="100" value=(v.name)
                aria-invalid=[name_i] aria-describedby=[name_d];
            (notes.at("f-name"))
            label for="f-device" { "Device" }
            select id="f-device" name="device_id" aria-invalid=[dev_i] aria-describedby=[dev_d] {
                option value="" { "Choose a device…" }
                @for d in devices {
                    @let id = d["id"].as_str().unwrap_or("");
                    // A revoked device cannot be chosen, but the connection's own stays selectable so that the
                    // form can still be saved (to disable, rename or re-limit the connection) without moving it.
                    @let current = id == v.device_id;
                    @let revoked = d["status"].as_str() == Some("revoked");
                    option value=(id) selected[current] disabled[revoked && !current] {
                        (d["name"].as_str().unwrap_or("")) " (" (d["status"].as_str().unwrap_or("")) ")"
                    }
                }
            }
            (notes.at("f-device"))
            fieldset.limit {
                legend { "Bandwidth limit (both directions; empty: unlimited)" }
                label.sr for="f-limit" { "Limit" }
                input id="f-limit" name="limit" inputmode="decimal" value=(v.limit) placeholder="unlimited"
                    aria-invalid=[lim_i] aria-describedby=[lim_d];
                label.sr for="f-unit" { "Unit" }
                select id="f-unit" name="unit" {
                    option value="MB" selected[v.unit == "MB"] { "MB" }
                    option value="GB" selected[v.unit != "MB"] { "GB" }
                }
            }
            (notes.at("f-limit"))
            label.check { input type="checkbox" name="enabled" checked[v.enabled]; " Enabled" }
            button type="submit" { (submit) }
            (notes.at("f-form"))
        }
    }
}
