// The billing page: every number is a string the API returned, shown as it came.
"use strict";

const state = { customer: "", token: "" };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function table(headers, rows, attrs) {
  const head = el("tr", {}, ...headers.map((h) => el("th", { scope: "col", class: h.num ? "num" : "" }, h.label)));
  const body = rows.map((r) => el("tr", r.attrs || {}, ...r.cells.map((c, i) =>
    el("td", { class: headers[i].num ? "num" : "", ...(c.attrs || {}) }, c.text ?? c))));
  return el("table", attrs || {}, el("thead", {}, head), el("tbody", {}, ...body));
}

function showError(text) {
  const box = document.getElementById("error");
  box.textContent = text;
  box.hidden = false;
}

async function api(path) {
  const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
  const response = await fetch(path, { headers, cache: "no-store" });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  return { status: response.status, body };
}

function monthBounds(now) {
  const start = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1));
  const end = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + 1, 1));
  const label = start.toISOString().slice(0, 7);
  return { start, end, label };
}

function customerPath(suffix) {
  return `/v1/customers/${encodeURIComponent(state.customer)}/${suffix}`;
}

function chart(meter, days, rows) {
  const perDay = new Map();
  for (const r of rows) perDay.set(r.day, (perDay.get(r.day) || 0) + Number(r.value));
  const width = 320, height = 120, gap = 1;
  const barWidth = width / days.length;
  const top = Math.max(1, ...perDay.values());
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height + 14}`, role: "img",
    "aria-label": `${meter}: daily values this period` });
  days.forEach((day, i) => {
    const v = perDay.get(day) || 0;
    const h = Math.max(0, (v / top) * height);
    const bar = svgEl("rect", { class: "bar", x: i * barWidth + gap / 2, y: height - h,
      width: Math.max(0.5, barWidth - gap), height: h });
    const title = svgEl("title", {});
    title.textContent = `${day}: ${rows.filter((r) => r.day === day).map((r) => r.value).join(" + ") || "0"}`;
    bar.append(title);
    svg.append(bar);
  });
  const axis = svgEl("text", { x: 0, y: height + 12, "font-size": 10, fill: "#4a4a4a" });
  axis.textContent = `${days[0]} … ${days[days.length - 1]}`;
  svg.append(axis);
  return svg;
}

async function loadUsage(bounds) {
  const range = `from=${bounds.start.toISOString()}&to=${bounds.end.toISOString()}`;
  const [daily, totals] = await Promise.all([
    api(customerPath(`usage?${range}&window=day`)), api(customerPath(`usage?${range}`))]);
  const box = document.getElementById("usage-meters");
  box.replaceChildren();
  if (daily.status !== 200 || totals.status !== 200) {
    const failed = daily.status !== 200 ? daily : totals;
    showError(`usage: ${failed.status} ${(failed.body && failed.body.error) || ""}`);
    return;
  }
  const days = [];
  for (let d = new Date(bounds.start); d < bounds.end; d = new Date(d.getTime() + 86400000)) {
    days.push(d.toISOString().slice(0, 10));
  }
  const meters = [...new Set(totals.body.usage.map((r) => r.meter))].sort();
  if (!meters.length) box.append(el("p", { class: "note" }, "No usage this period."));
  for (const meter of meters) {
    const dayRows = daily.body.usage.filter((r) => r.meter === meter).map((r) => ({
      day: new Date(r.period_start_ms).toISOString().slice(0, 10), group: r.group_key,
      value: r.value, count: r.event_count }));
    const total = totals.body.usage.filter((r) => r.meter === meter);
    const dailyTable = table(
      [{ label: "day" }, { label: "group" }, { label: "value", num: true }, { label: "events", num: true }],
      [...dayRows.map((r) => ({ attrs: { "data-day": r.day, "data-group": r.group },
        cells: [r.day, r.group, { text: r.value, attrs: { "data-value": "" } }, r.count] })),
       ...total.map((t) => ({ attrs: { class: "total", "data-total": t.group_key },
        cells: ["period", t.group_key, { text: t.value, attrs: { "data-value": "" } }, t.event_count] }))],
      { "data-meter": meter, "aria-label": `${meter} per day` });
    const aggregation = total.length ? total[0].aggregation : "";
    box.append(el("h3", {}, `${meter} (${aggregation})`),
      el("div", { class: "meter" }, chart(meter, days, dayRows), dailyTable));
  }
}

function moneyRows(preview) {
  const rows = [];
  for (const line of preview.lines || []) {
    rows.push({ attrs: { "data-line": line.meter || line.kind || "" },
      cells: [line.description || line.meter || "", line.quantity ?? "", line.amount ?? ""] });
    for (const tier of line.tiers || []) {
      rows.push({ cells: [`tier ${tier.tier} (${tier.from} to ${tier.up_to})`, tier.units, tier.amount] });
    }
  }
  return rows;
}

// Unless `got` is a 200: a note in `body` (`offNote` for a 404, the feature being off on
// this meterstream, where given) and true.
function noted(body, got, offNote) {
  if (got.status === 200) return false;
  const text = got.status === 404 && offNote ? offNote : `Not available (${got.status}).`;
  body.replaceChildren(el("p", { class: "note" }, text));
  return true;
}

async function loadInvoice(bounds) {
  const body = document.getElementById("invoice-body");
  const preview = await api(customerPath(`invoice-preview?period=${bounds.label}`));
  if (noted(body, preview, "No prices are configured on this meterstream.")) return;
  const p = preview.body;
  const rows = moneyRows(p);
  rows.push({ attrs: { class: "total", "data-subtotal": "" }, cells: ["subtotal", "", p.subtotal ?? ""] });
  rows.push({ attrs: { class: "total", "data-total": "" }, cells: ["total", "", p.total ?? ""] });
  const plans = [...new Set((p.segments || []).map((s) => s.plan))].join(", ");
  body.replaceChildren(el("p", {}, `Plan ${plans || "-"}, ${(p.currency || "").toUpperCase()}`),
    table([{ label: "line" }, { label: "quantity", num: true }, { label: "amount", num: true }], rows,
      { "aria-label": "upcoming invoice" }));
}

async function loadCredits() {
  const body = document.getElementById("credits-body");
  const [found, credits] = await Promise.all([
    api(customerPath("entitlements")), api(customerPath("credits"))]);
  if (noted(body, found, "Prepaid credits and alerts are not enabled on this meterstream.")) return;
  const e = found.body;
  const why = e.reasons.map((r) => r.replaceAll("_", " ")).join(", ");
  const parts = [el("p", {}, "Access: ",
    el("strong", { id: "credits-access" }, e.has_access ? "yes" : `no (${why})`))];
  if (credits.status === 200) {
    const c = credits.body;
    parts.push(el("p", {}, "Balance: ",
      el("strong", { id: "credits-balance" }, `${c.balance} ${c.currency.toUpperCase()}`)));
    parts.push(c.grants.length ? table(
      [{ label: "grant" }, { label: "left / granted", num: true }, { label: "until" }],
      c.grants.map((g) => ({ attrs: { "data-grant": g.grant_id, title: `priority ${g.priority}` },
        cells: [g.grant_id.slice(0, 12), `${g.remaining} / ${g.amount}`,
          g.voided_ms ? `voided ${when(g.voided_ms)}` : when(g.expires_ms)] })),
      { "aria-label": "credit grants" }) : el("p", { class: "note" }, "No grants."));
    const ledger = await api(customerPath("credits/ledger"));
    const days = ledger.status === 200 ? ledger.body.balance_by_day : [];
    if (days.length) {
      const rows = days.map((d) => ({ day: d.day, value: d.balance }));
      parts.push(el("h3", {}, "Balance over time"), el("div", { class: "meter" },
        chart("balance", days.map((d) => d.day), rows),
        table([{ label: "day" }, { label: "balance at its end", num: true }],
          days.map((d) => ({ attrs: { "data-balance-day": d.day },
            cells: [d.day, { text: d.balance, attrs: { "data-value": "" } }] })),
          { "aria-label": "balance over time" })));
    }
  } else {
    parts.push(el("p", { class: "note" }, "No prepaid credits: usage is invoiced."));
  }
  const meters = Object.entries(e.usage);
  if (meters.length) {
    parts.push(table([{ label: "meter" }, { label: `used in ${e.period}`, num: true },
      { label: "limit", num: true }],
      meters.map(([m, u]) => ({ cells: [m, u.used, u.limit ?? "none"] })),
      { "aria-label": "usage this period" }));
  }
  const alerts = await api(customerPath("credits/alerts"));
  const set = alerts.status === 200 ? alerts.body.thresholds : [];
  parts.push(set.length ? table([{ label: "alert" }, { label: "when" }, { label: "state" }],
    set.map((t) => ({ attrs: { "data-threshold": t.threshold_id }, cells: [t.threshold_id,
      `${t.kind.replaceAll("_", " ")}${t.amount ? ` ${t.amount}` : ""}${t.meter ? ` (${t.meter})` : ""}`,
      alerts.body.states[t.threshold_id]?.fired ? "fired" : "armed"] })),
    { "aria-label": "alerts" }) : el("p", { class: "note" }, "No alerts set."));
  body.replaceChildren(...parts);
}

function when(ms) { return ms ? new Date(ms).toISOString().replace(".000Z", "Z") : "never"; }

// A section's body element and the customer's `path` read from the API: null, and a note
// in the body, unless the answer is 200.
async function readInto(bodyId, path) {
  const body = document.getElementById(bodyId);
  const got = await api(customerPath(path));
  return noted(body, got) ? null : { body, data: got.body };
}

async function loadStripe() {
  const got = await readInto("stripe-body", "stripe-status");
  if (!got) return;
  const { body, data: s } = got;
  const counts = Object.entries(s.counts).map(([k, v]) => `${v} ${k}`).join(", ") || "nothing sent yet";
  body.replaceChildren(
    el("p", {}, "Last accepted by Stripe: ", el("strong", { id: "stripe-last" }, when(s.last_sent_at_ms))),
    el("p", { id: "stripe-counts" }, `Meter events: ${counts}.`),
    s.waiting.length ? table([{ label: "meter" }, { label: "period" }, { label: "value", num: true },
      { label: "status" }, { label: "error" }, { label: "attempts", num: true }],
      s.waiting.map((w) => ({ cells: [w.meter, w.period, w.value, w.status, w.error_code, w.attempts] })),
      { "aria-label": "waiting for Stripe" })
      : el("p", { class: "note" }, "Nothing waiting."));
}

async function loadRejected() {
  const got = await readInto("rejected-body", "rejected?limit=20");
  if (!got) return;
  const { body } = got;
  const rows = got.data.rejected;
  body.replaceChildren(rows.length ? table(
    [{ label: "received" }, { label: "reason" }, { label: "key" }, { label: "detail" }],
    rows.map((r) => ({ attrs: { "data-key": r.idempotency_key },
      cells: [r.received_at, r.reason, r.idempotency_key, r.detail] })),
    { "aria-label": "rejected events" }) : el("p", { class: "note" }, "No rejected events."));
}

async function lookup(event) {
  event.preventDefault();
  const key = document.getElementById("lookup-key").value.trim();
  const out = document.getElementById("lookup-result");
  if (!key) return;
  const got = await api(`/v1/events/${encodeURIComponent(state.customer)}/${encodeURIComponent(key)}`);
  if (got.status !== 200) {
    out.replaceChildren(el("p", {}, `Lookup failed (${got.status}).`));
    return;
  }
  const f = got.body;
  const lines = [el("p", { id: "fate" }, el("strong", {}, f.fate), `: ${f.summary}`)];
  for (const c of f.counted || []) {
    lines.push(el("p", {}, `${c.meter}: took ${c.value_taken} in ${c.window_start} … ${c.window_end}; window now ${c.window_value}`));
  }
  for (const n of f.not_counted || []) lines.push(el("p", {}, `not counted by ${n.meter || "any meter"}: ${n.detail}`));
  for (const r of [...(f.conflicting_copies || []), ...(f.rejections || [])]) {
    lines.push(el("p", {}, `${r.received_at} ${r.reason}: ${r.detail}`));
  }
  out.replaceChildren(...lines);
}

function start() {
  const match = location.pathname.match(/^\/billing\/([^/]+)$/);
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("link")) {
    state.token = fragment.get("link");
    sessionStorage.setItem("meterstream-link", state.token);
    history.replaceState(null, "", location.pathname);  // the token leaves the address bar
  } else {
    state.token = sessionStorage.getItem("meterstream-link") || sessionStorage.getItem("meterstream-key") || "";
  }
  if (!match) {
    document.getElementById("access").hidden = false;
    for (const id of ["usage", "invoice", "credits", "stripe", "rejected", "lookup"]) {
      document.getElementById(id).hidden = true;
    }
    document.getElementById("access-form").addEventListener("submit", (e) => {
      e.preventDefault();
      sessionStorage.removeItem("meterstream-link");
      sessionStorage.setItem("meterstream-key", document.getElementById("api-key").value.trim());
      location.assign(`/billing/${encodeURIComponent(document.getElementById("customer-id").value.trim())}`);
    });
    return;
  }
  state.customer = decodeURIComponent(match[1]);
  document.getElementById("customer-name").textContent = `· ${state.customer}`;
  const bounds = monthBounds(new Date());
  document.getElementById("period-line").textContent = `Period ${bounds.label} (UTC)`;
  document.getElementById("lookup-form").addEventListener("submit", lookup);
  Promise.all([loadUsage(bounds), loadInvoice(bounds), loadCredits(), loadStripe(), loadRejected()])
    .then(() => document.body.setAttribute("data-loaded", "true"))
    .catch((e) => showError(String(e)));
}

document.addEventListener("DOMContentLoaded", start);
