// proxyfleet dashboard: live updates (server-sent events), confirmation dialogs, copy and download buttons.
// Pages work without it except for live updates; no library, no build step.
"use strict";

// Live updates: every element marked data-live="device:ID" or "conn:ID" takes the snapshot's state, texts and bar.
function applySnapshot(snap) {
  for (const item of snap.items) {
    for (const el of document.querySelectorAll('[data-live="' + CSS.escape(item.key) + '"]')) {
      el.dataset.state = item.state;
      for (const f of el.querySelectorAll("[data-f]")) {
        const v = item.cells[f.dataset.f];
        if (typeof v === "string" && f.textContent !== v) f.textContent = v;
      }
      const bar = el.querySelector(".bar");
      if (bar && "pct" in item) {
        bar.hidden = item.pct === null;
        if (item.pct !== null) {
          bar.setAttribute("aria-valuenow", String(item.pct));
          bar.firstElementChild.style.width = item.pct + "%";
        }
      }
    }
  }
}

function startLive() {
  if (!document.querySelector("[data-live]") || !window.EventSource) return;
  const kinds = new Set([...document.querySelectorAll("[data-live]")].map((e) => e.dataset.live.split(":")[0]));
  const es = new EventSource("/dashboard/events?kinds=" + [...kinds].join(","));
  es.addEventListener("snapshot", (e) => applySnapshot(JSON.parse(e.data)));
  // The session ended (logout elsewhere, revoked, expired): reloading leads to the login page.
  es.addEventListener("ended", () => { es.close(); location.reload(); });
  document.documentElement.dataset.live = "connecting";
  es.onopen = () => { document.documentElement.dataset.live = "on"; };
  es.onerror = () => { document.documentElement.dataset.live = "retrying"; };
  // A page left for another must let its stream go at once: the browser allows only six connections per server,
  // and a page kept in the back/forward cache would otherwise hold one.
  window.addEventListener("pagehide", () => es.close(), { once: true });
}
window.addEventListener("pageshow", (e) => { if (e.persisted) startLive(); });

// Confirmation: a form with data-confirm asks in a modal <dialog> (Esc or Cancel keeps things as they are).
function setupConfirm() {
  const dlg = document.getElementById("confirm");
  if (!dlg) return;
  let pending = null;
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (e) => {
      if (form.dataset.confirmed === "yes") return;
      e.preventDefault();
      pending = form;
      document.getElementById("confirm-text").textContent = form.dataset.confirm;
      dlg.showModal();
    });
  }
  document.getElementById("confirm-yes").addEventListener("click", () => {
    dlg.close();
    if (pending) { pending.dataset.confirmed = "yes"; pending.requestSubmit(); }
  });
  document.getElementById("confirm-no").addEventListener("click", () => { pending = null; dlg.close(); });
  dlg.addEventListener("close", () => { if (pending && pending.dataset.confirmed !== "yes") pending = null; });
}

async function copyText(input, button) {
  input.select();
  let ok = false;
  try { await navigator.clipboard.writeText(input.value); ok = true; }
  catch (_) { ok = document.execCommand && document.execCommand("copy"); }
  button.textContent = ok ? "Copied" : "Press Ctrl+C";
  setTimeout(() => { button.textContent = "Copy"; }, 2000);
}

function setupButtons() {
  for (const b of document.querySelectorAll("button[data-copy]")) {
    b.addEventListener("click", () => copyText(document.getElementById(b.dataset.copy), b));
  }
  for (const b of document.querySelectorAll("button[data-download]")) {
    b.addEventListener("click", () => {
      const text = document.getElementById(b.dataset.download).value;
      const url = URL.createObjectURL(new Blob([text], { type: "application/x-openvpn-profile" }));
      const a = document.createElement("a");
      a.href = url;
      a.download = b.dataset.filename || "profile.ovpn";
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 1000);
    });
  }
}

// A submitted form's button says it is working (an IP rotation can take minutes) and cannot be pressed twice.
document.addEventListener("submit", (e) => {
  if (e.defaultPrevented) return;
  const b = e.target.querySelector("button[type=submit]");
  if (b) { b.disabled = true; b.setAttribute("aria-busy", "true"); b.dataset.label = b.textContent; b.textContent = "Working…"; }
});
window.addEventListener("pageshow", () => {
  for (const b of document.querySelectorAll("button[aria-busy]")) {
    b.disabled = false; b.removeAttribute("aria-busy"); b.textContent = b.dataset.label;
  }
});

document.addEventListener("DOMContentLoaded", () => { setupConfirm(); setupButtons(); startLive(); });
