// safekit web console: vanilla JavaScript, no build step, no CDN.
// Logs in through /api/v1/login, reads every node through proxy mode
// (/api/v1/nodes/<node>/...) and follows each node's event stream.
"use strict";

const $ = (sel, el = document) => el.querySelector(sel);

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "data") Object.assign(el.dataset, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const ROLES = { monitor: 0, control: 1, admin: 2 };
// Verbs of the control menu: [label, verb, query]; all but start ask first.
const VERBS = [
  ["start", "start", ""], ["stop", "stop", ""], ["restart", "restart", ""],
  ["stopstart", "stopstart", ""], ["forcestop", "forcestop", ""],
  ["swap", "swap", ""], ["swap nosync", "swap", "?sync=nosync"],
  ["prim", "prim", ""], ["prim fullsync", "prim", "?sync=fullsync"],
  ["second", "second", ""], ["second fullsync", "second", "?sync=fullsync"],
  ["primforce", "primforce", ""],
];

let session = null; // {user, role, csrf, node}
let cluster = null; // ClusterInfo of the node serving the console
const nodes = {}; // node name -> {status, reachable, es, retry}
let followTimer = null;

async function api(method, path, body) {
  const opts = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  if (method !== "GET" && session && session.csrf) opts.headers["X-CSRF-Token"] = session.csrf;
  let r;
  try {
    r = await fetch(path, opts);
  } catch (e) {
    return { status: 0, ok: false, data: { error: String(e) } };
  }
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  if (r.status === 401 && path !== "/api/v1/login" && session) {
    logoutLocal("Your session ended: log in again.");
  }
  return { status: r.status, ok: r.ok, data };
}

const nodePath = (node, rest) => `/api/v1/nodes/${encodeURIComponent(node)}/${rest}`;

function toast(text, bad) {
  const t = $("#toast");
  t.textContent = text;
  t.className = bad ? "bad" : "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 6000);
}

function mib(n) { return (n / 1048576).toFixed(1) + " MiB"; }
function duration(s) {
  if (s === null || s === undefined) return "-";
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

// ---- login ---------------------------------------------------------------

function logoutLocal(message) {
  session = null;
  for (const st of Object.values(nodes)) { if (st.es) st.es.close(); clearTimeout(st.retry); }
  for (const k of Object.keys(nodes)) delete nodes[k];
  clearInterval(followTimer);
  showLogin(message);
}

function showLogin(message) {
  $("#nav").hidden = true;
  const err = h("p", { id: "login-error", class: "error" }, message || "");
  const form = h("form", { class: "login", id: "login" },
    h("h1", {}, "safekit console"),
    h("label", {}, "User", h("input", { id: "login-user", name: "user", autocomplete: "username", required: true })),
    h("label", {}, "Password", h("input", { id: "login-password", name: "password", type: "password", autocomplete: "current-password", required: true })),
    h("button", { type: "submit", id: "login-submit" }, "Log in"),
    err);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const r = await api("POST", "/api/v1/login", { user: $("#login-user").value, password: $("#login-password").value });
    if (r.ok) { session = r.data; start(); } else { err.textContent = (r.data && r.data.error) || "login failed"; }
  });
  $("#main").replaceChildren(form);
}

// ---- nodes and their event streams ---------------------------------------

function connect(node) {
  const st = nodes[node] || (nodes[node] = { status: null, reachable: null });
  if (st.es) st.es.close();
  const es = new EventSource(nodePath(node, "events"));
  st.es = es;
  es.addEventListener("status", (ev) => {
    st.status = JSON.parse(ev.data);
    st.reachable = true;
    update();
  });
  es.onerror = () => {
    st.reachable = false;
    update();
    // A refused stream (502: node unreachable) is not retried by the browser.
    if (es.readyState === EventSource.CLOSED) {
      clearTimeout(st.retry);
      st.retry = setTimeout(() => { if (session) connect(node); }, 3000);
    }
  };
}

async function start() {
  $("#nav").hidden = false;
  $("#whoami").textContent = `${session.user} (${session.role}) on ${session.node}`;
  const r = await api("GET", "/api/v1/cluster");
  if (!r.ok) return;
  cluster = r.data;
  for (const n of cluster.nodes) connect(n.name);
  route();
}

function moduleNames() {
  const names = new Set(cluster ? cluster.modules : []);
  for (const st of Object.values(nodes)) {
    if (st.status) for (const m of st.status.modules) names.add(m.name);
  }
  return [...names].sort();
}

function moduleOn(node, name) {
  const st = nodes[node];
  return st && st.status ? st.status.modules.find((m) => m.name === name) : undefined;
}

// ---- control menu --------------------------------------------------------

function confirmDialog(text) {
  return new Promise((resolve) => {
    const d = $("#confirm");
    $("#confirm-text").textContent = text;
    const done = (v) => { d.close(); $("#confirm-yes").onclick = null; $("#confirm-no").onclick = null; resolve(v); };
    $("#confirm-yes").onclick = () => done(true);
    $("#confirm-no").onclick = () => done(false);
    d.showModal();
  });
}

async function runVerb(node, module, index) {
  const [label, verb, query] = VERBS[index];
  if (verb !== "start" && !(await confirmDialog(`Run "${label}" on ${node} for module ${module}?`))) return;
  const r = await api("POST", nodePath(node, `modules/${encodeURIComponent(module)}/${verb}${query}`));
  if (r.ok) toast(`${node}: ${r.data.message}`);
  else toast(`${node}: ${(r.data && r.data.error) || r.status}`, true);
}

// The verb chosen in each menu survives the redraws of live updates.
const chosen = {};

function menu(node, module) {
  if (!session || ROLES[session.role] < ROLES.control) return null;
  const key = `${node}/${module}`;
  const sel = h("select", { class: "verb", "aria-label": `verb for ${module} on ${node}`, data: { node, module } },
    VERBS.map(([label], i) => h("option", { value: String(i) }, label)));
  sel.value = chosen[key] || "0";
  sel.addEventListener("change", () => { chosen[key] = sel.value; });
  const btn = h("button", { type: "button", class: "run", data: { node, module } }, "Run");
  btn.addEventListener("click", () => runVerb(node, module, Number(sel.value)));
  return h("div", { class: "menu" }, sel, btn);
}

// ---- cluster view --------------------------------------------------------

function stateCell(node, name, withMenu) {
  const st = nodes[node];
  const m = moduleOn(node, name);
  if (st && st.reachable === false) {
    return h("td", { class: "state colour-grey", data: { node, module: name, state: "UNREACHABLE", colour: "grey" } }, "unreachable");
  }
  if (!m) return h("td", { data: { node, module: name, state: "NONE" } }, st && st.status ? "not configured" : "…");
  const peers = m.peers.map((p) => `${p.node}: ${p.state || (p.lost ? "lost" : "?")}`).join(", ");
  const rfs = m.rfs.filter((d) => d.resync_active);
  return h("td", { class: `state colour-${m.colour}`, data: { node, module: name, state: m.state, colour: m.colour } },
    m.state,
    rfs.length ? h("div", { class: "peer" }, `resync ${rfs.map((d) => Math.floor(100 * d.bytes_done / Math.max(1, d.bytes_total)) + "%").join(", ")}`) : null,
    peers ? h("div", { class: "peer" }, "sees " + peers) : null,
    withMenu ? menu(node, name) : null);
}

function renderCluster() {
  const names = moduleNames();
  const head = h("tr", {}, h("th", {}, "module"), cluster.nodes.map((n) => {
    const st = nodes[n.name];
    return h("th", { data: { node: n.name } }, n.name,
      st && st.reachable === false ? h("div", { class: "node-down" }, "unreachable") : null);
  }));
  const rows = names.map((name) => h("tr", { data: { module: name } },
    h("td", {}, h("a", { href: `#/module/${encodeURIComponent(name)}` }, name)),
    cluster.nodes.map((n) => stateCell(n.name, name, true))));
  $("#main").replaceChildren(
    h("h1", {}, `Cluster ${cluster.name}`),
    h("table", { id: "cluster" }, h("thead", {}, head), h("tbody", {}, rows)));
}

// ---- module page -----------------------------------------------------------

const TIMELINE_HOURS = 6;
let histories = {};

async function loadHistories(name) {
  histories = {};
  await Promise.all(cluster.nodes.map(async (n) => {
    const r = await api("GET", nodePath(n.name, `modules/${encodeURIComponent(name)}/history`));
    if (r.ok) histories[n.name] = r.data.entries;
  }));
  update();
}

function timeline(node) {
  const entries = histories[node] || [];
  const end = Date.now();
  const startT = end - TIMELINE_HOURS * 3600 * 1000;
  const bar = h("div", { class: "timeline", data: { node } });
  entries.forEach((e, i) => {
    const from = Math.max(e.at_ms, startT);
    const to = i + 1 < entries.length ? entries[i + 1].at_ms : end;
    if (to <= startT) return;
    const seg = h("div", { class: `colour-${e.colour}`, title: `${e.state} from ${new Date(e.at_ms).toLocaleString()}` });
    seg.style.width = (100 * (to - from) / (end - startT)) + "%";
    bar.append(seg);
  });
  return [bar, h("div", { class: "axis" }, h("span", {}, `-${TIMELINE_HOURS} h`), h("span", {}, "now"))];
}

const PALETTE = ["#3b6fd3", "#d36b3b", "#3bb3a0", "#9b59b6", "#c0a020", "#5a8f29", "#c0398d", "#607d8b"];

function bucketMap(farm) {
  const owner = new Array(256).fill(null);
  const names = Object.keys(farm.assignment || {}).sort();
  names.forEach((n) => { for (const b of farm.assignment[n]) owner[b] = n; });
  const grid = h("div", { class: "buckets" }, owner.map((n, b) => {
    const s = h("span", { title: `bucket ${b}: ${n || "nobody"}` });
    s.style.background = n ? PALETTE[names.indexOf(n) % PALETTE.length] : "#ddd";
    return s;
  }));
  const legend = h("div", { class: "peer" }, names.map((n, i) => {
    const dot = h("span", { class: "badge" }, `${n}: ${farm.assignment[n].length}`);
    dot.style.background = PALETTE[i % PALETTE.length];
    return [dot, " "];
  }));
  return [grid, legend];
}

function nodeCard(node, name) {
  const st = nodes[node];
  const m = moduleOn(node, name);
  const card = h("div", { class: "card", data: { node } }, h("h2", {}, node));
  if (st && st.reachable === false) { card.append(h("p", { class: "node-down" }, "unreachable")); return card; }
  if (!m) { card.append(h("p", {}, "…")); return card; }
  const badge = h("span", { class: `badge colour-${m.colour}`, data: { node, module: name, state: m.state, colour: m.colour } }, m.state);
  card.append(h("p", {}, badge, " ", menu(node, name)));
  card.append(h("h3", {}, "State, last hours"), ...timeline(node));
  for (const d of m.rfs) {
    card.append(h("h3", {}, `Replicated ${d.path}: ${d.link}`));
    const p = h("progress", { class: "resync", data: { node, path: d.path, active: String(d.resync_active) } });
    p.max = Math.max(1, d.bytes_total);
    p.value = d.bytes_done;
    card.append(p, h("div", { class: "peer resync-text", data: { node } },
      `${mib(d.bytes_done)} / ${mib(d.bytes_total)}, files ${d.files_done} / ${d.files_total}, ` +
      `${mib(d.rate)}/s, ETA ${duration(d.eta_secs)}${d.resync_active ? "" : " (not running)"}` +
      (d.failure ? ` — ${d.failure}` : "")));
  }
  if (m.farm) card.append(h("h3", {}, "Farm buckets"), ...bucketMap(m.farm));
  if (m.checkers && m.checkers.length) {
    card.append(h("h3", {}, "Checkers"),
      h("table", { class: "checkers" }, m.checkers.map((c) => h("tr", { data: { node, checker: c.id, up: String(c.up) } },
        h("th", {}, c.what),
        h("td", { class: `state colour-${c.up ? "green" : "red"}` }, c.up ? "up" : "down"),
        h("td", {}, c.reason || ""),
        h("td", {}, new Date(c.at_ms).toLocaleTimeString())))));
  }
  if (m.details.length) {
    card.append(h("h3", {}, "Details"),
      h("table", { class: "details" }, m.details.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v)))));
  }
  return card;
}

let logState = { node: null, from: 0 };

async function pollLog(name) {
  const pre = $("#log");
  if (!pre) return;
  const node = $("#log-node").value;
  if (node !== logState.node) { logState = { node, from: null }; pre.textContent = ""; }
  const q = logState.from === null ? "limit=200" : `from=${logState.from}&limit=1000`;
  const r = await api("GET", nodePath(node, `modules/${encodeURIComponent(name)}/log?${q}`));
  if (!r.ok) { pre.textContent = (r.data && r.data.error) || "log unavailable"; return; }
  if (r.data.lines.length) {
    pre.textContent += r.data.lines.join("\n") + "\n";
    pre.scrollTop = pre.scrollHeight;
  }
  logState.from = r.data.from + r.data.lines.length;
}

function renderModule(name) {
  const page = h("div", { id: "module-page", data: { module: name } },
    h("h1", {}, `Module ${name}`),
    h("div", { class: "cards", id: "module-cards" }),
    h("h2", {}, "Log"),
    h("div", {},
      h("select", { id: "log-node" }, cluster.nodes.map((n) => h("option", { value: n.name }, n.name))),
      h("label", {}, h("input", { type: "checkbox", id: "log-follow", checked: true }), " follow")),
    h("pre", { id: "log" }));
  $("#main").replaceChildren(page);
  logState = { node: null, from: null };
  $("#log-node").addEventListener("change", () => pollLog(name));
  clearInterval(followTimer);
  followTimer = setInterval(() => { if ($("#log-follow") && $("#log-follow").checked) pollLog(name); }, 2000);
  pollLog(name);
  loadHistories(name);
  updateModule(name);
}

function updateModule(name) {
  const cards = $("#module-cards");
  if (cards) cards.replaceChildren(...cluster.nodes.map((n) => nodeCard(n.name, name)));
}

// ---- configuration -------------------------------------------------------

function gutter(text, errLines) {
  const n = text.split("\n").length;
  const g = h("pre", { class: "gutter" });
  for (let i = 1; i <= n; i++) g.append(h("span", { class: errLines.has(i) ? "err" : "", data: { line: String(i) } }, i));
  return g;
}

async function renderConfig() {
  clearInterval(followTimer);
  const r = await api("GET", "/api/v1/config");
  if (!r.ok) return;
  const admin = ROLES[session.role] >= ROLES.admin;
  const editors = r.data.files.map((f) => {
    const ta = h("textarea", { spellcheck: "false", data: { path: f.path }, readonly: !admin });
    ta.value = f.text;
    const wrap = h("div", { class: "editor", data: { path: f.path } }, gutter(f.text, new Set()), ta);
    ta.addEventListener("input", () => wrap.firstChild.replaceWith(gutter(ta.value, new Set())));
    return h("section", {}, h("h2", {}, f.path), wrap);
  });
  const result = h("p", { id: "config-result" });
  const errors = h("ul", { id: "config-errors" });
  const files = () => [...document.querySelectorAll(".editor textarea")].map((t) => ({ path: t.dataset.path, text: t.value }));
  const check = h("button", { type: "button", id: "config-check", disabled: !admin }, "Check");
  const apply = h("button", { type: "button", id: "config-apply", class: "danger", disabled: !admin }, "Apply to every node");
  check.addEventListener("click", async () => {
    const c = await api("POST", "/api/v1/config/check", { files: files() });
    errors.replaceChildren();
    if (!c.ok) { result.className = "error"; result.textContent = (c.data && c.data.error) || String(c.status); return; }
    result.className = c.data.ok ? "ok" : "error";
    result.textContent = c.data.ok ? "Configuration OK" : `${c.data.errors.length} error(s)`;
    const byFile = {};
    for (const e of c.data.errors) {
      errors.append(h("li", { data: { file: e.file, line: String(e.line || "") } },
        `${e.file}${e.line ? ":" + e.line : ""} ${e.key ? "[" + e.key + "] " : ""}${e.message}`));
      (byFile[e.file] = byFile[e.file] || new Set()).add(e.line);
    }
    for (const wrap of document.querySelectorAll(".editor")) {
      const ta = wrap.querySelector("textarea");
      wrap.firstChild.replaceWith(gutter(ta.value, byFile[wrap.dataset.path] || new Set()));
    }
  });
  apply.addEventListener("click", async () => {
    if (!(await confirmDialog("Apply this configuration to every node?"))) return;
    const a = await api("POST", "/api/v1/config/apply", { files: files() });
    result.className = a.ok ? "ok" : "error";
    result.textContent = a.ok ? a.data.message : (a.data && a.data.error) || String(a.status);
  });
  $("#main").replaceChildren(h("h1", {}, "Configuration"),
    h("p", {}, h("span", {}, `Files of ${session.node}. `), check, " ", apply), result, errors, ...editors);
}

// ---- routing ---------------------------------------------------------------

function currentRoute() {
  const hash = location.hash || "#/";
  const m = hash.match(/^#\/module\/(.+)$/);
  if (m) return { page: "module", module: decodeURIComponent(m[1]) };
  if (hash === "#/config") return { page: "config" };
  return { page: "cluster" };
}

function route() {
  if (!session || !cluster) return;
  const r = currentRoute();
  if (r.page === "module") renderModule(r.module);
  else if (r.page === "config") renderConfig();
  else { clearInterval(followTimer); renderCluster(); }
}

// Live updates: the cluster and module views follow the event streams;
// the configuration editor is left alone.
function update() {
  if (!session || !cluster) return;
  const r = currentRoute();
  if (r.page === "cluster") {
    // Keep an open menu's selection while redrawing.
    const active = document.activeElement;
    if (active && active.classList.contains("verb")) return;
    renderCluster();
  } else if (r.page === "module") {
    const active = document.activeElement;
    if (active && active.classList.contains("verb")) return;
    updateModule(r.module);
  }
}

window.addEventListener("hashchange", route);
$("#logout").addEventListener("click", async () => {
  await api("POST", "/api/v1/logout");
  logoutLocal("Logged out.");
});

(async () => {
  const r = await fetch("/api/v1/session", { credentials: "same-origin" });
  if (r.ok) { session = await r.json(); start(); } else showLogin();
})();
