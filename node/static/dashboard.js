// The dashboard: polls this node's /admin/* with the login cookie and redraws.
// No framework: every table is rebuilt from the latest answer with textContent,
// so names coming from clients are never parsed as HTML.
"use strict";

const POLL_MS = 2000;
const FETCH_TIMEOUT_MS = 5000;
const RATE_POINTS_MAX = 60; // two minutes of polls
const QUEUE_PAGE_ROWS = 25;
const SESSION_ROWS_MAX = 100;

const RATES = [
  { key: "publish", counter: "publishes_total" },
  { key: "deliver", counter: "deliveries_total" },
  { key: "ack", counter: "acks_total" },
];

const view = {
  queueOffset: 0,
  queueTotal: 0,
  traceIdem: "",
  counters: new Map(), // node id -> {atMs, publish, deliver, ack}
  series: { publish: [], deliver: [], ack: [] },
  leaving: false,
};

function byId(id) {
  return document.getElementById(id);
}

class SignedOut extends Error {}

async function getJson(path) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
  try {
    const response = await fetch(path, {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
      signal: abort.signal,
    });
    if (response.status === 401) throw new SignedOut();
    const body = await response.json().catch(() => null);
    return { status: response.status, body };
  } finally {
    clearTimeout(timer);
  }
}

// -- formatting -------------------------------------------------------------

function count(n) {
  return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US");
}

function rate(perSecond) {
  if (perSecond === undefined) return "–";
  return (perSecond < 10 ? perSecond.toFixed(1) : Math.round(perSecond)) + "/s";
}

function utc(ms) {
  if (ms === null || ms === undefined) return "–";
  return new Date(ms).toISOString().replace("T", " ").slice(0, 23);
}

function ago(ms) {
  if (ms === null || ms === undefined) return "–";
  const seconds = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (seconds < 90) return seconds + " s ago";
  if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
  return Math.round(seconds / 3600) + " h ago";
}

// -- building rows ------------------------------------------------------------

function cell(text, className, title) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (className) td.className = className;
  if (title) td.title = title;
  return td;
}

function tableRow(cells, className) {
  const tr = document.createElement("tr");
  tr.append(...cells);
  if (className) tr.className = className;
  return tr;
}

function fill(tbodyId, rows, columns, emptyText) {
  const body = byId(tbodyId);
  if (rows.length === 0) {
    const td = cell(emptyText, "empty");
    td.colSpan = columns;
    body.replaceChildren(tableRow([td]));
  } else {
    body.replaceChildren(...rows);
  }
}

function badge(text, kind) {
  const td = document.createElement("td");
  const span = document.createElement("span");
  span.className = "badge " + kind;
  span.textContent = text;
  td.append(span);
  return td;
}

// -- cluster ---------------------------------------------------------------------

function renderCluster(data) {
  byId("node-id").textContent = data.id;
  byId("leader").textContent = data.leader ?? "none";
  byId("term").textContent = count(data.term);
  document.title = "EnSync " + data.id + " · leader " + (data.leader ?? "none");

  const rows = data.nodes.map((node) => {
    const s = node.status ?? {};
    const name = node.id === data.id ? node.id + " (this node)" : node.id;
    const role = s.role ?? "unknown";
    const reach = node.reachable ? badge("yes", "ok") : badge("no", "bad");
    if (!node.reachable) reach.title = node.error ?? "";
    return tableRow([
      cell(name, "mono"),
      badge(role, role),
      cell(count(s.term), "num"),
      cell(count(s.commit_index), "num"),
      cell(count(s.applied_index), "num"),
      cell(count(node.lag_entries), "num"),
      cell(count(node.match_index), "num"),
      cell(count(s.clients), "num"),
      s.has_quorum === undefined ? cell("–") : badge(s.has_quorum ? "yes" : "no",
                                                     s.has_quorum ? "ok" : "bad"),
      reach,
    ], node.id === data.leader ? "leader" : node.reachable ? "" : "down");
  });
  fill("nodes-body", rows, 10, "no nodes");
}

// -- rates: client-side, from the nodes' counters -----------------------------------

function sampleRates(nodes, atMs) {
  const sums = { publish: 0, deliver: 0, ack: 0 };
  let sampled = false;
  for (const node of nodes) {
    if (!node.status) continue;
    const now = { atMs };
    for (const r of RATES) now[r.key] = node.status[r.counter] ?? 0;
    const before = view.counters.get(node.id);
    view.counters.set(node.id, now);
    const seconds = before ? (atMs - before.atMs) / 1000 : 0;
    if (seconds <= 0) continue;

    sampled = true;
    for (const r of RATES) {
      let delta = now[r.key] - before[r.key];
      if (delta < 0) delta = now[r.key]; // the node restarted: counters begin at 0
      sums[r.key] += delta / seconds;
    }
  }
  if (!sampled) return;
  for (const r of RATES) {
    const series = view.series[r.key];
    series.push(sums[r.key]);
    if (series.length > RATE_POINTS_MAX) series.shift();
  }
}

function drawChart(canvas, points) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  canvas.dataset.points = String(points.length);
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);

  const style = getComputedStyle(canvas);
  const top = Math.max(1, ...points) * 1.2;
  const pad = 4;
  const y = (v) => height - pad - (v / top) * (height - 2 * pad);
  const step = width / (RATE_POINTS_MAX - 1);
  const x = (i) => width - (points.length - 1 - i) * step;

  g.strokeStyle = style.borderColor;
  g.lineWidth = 1;
  g.beginPath();
  g.moveTo(0, y(0) + 0.5);
  g.lineTo(width, y(0) + 0.5);
  g.stroke();
  g.fillStyle = style.getPropertyValue("--muted").trim() || "#667085";
  g.font = "11px sans-serif";
  g.fillText("max " + rate(top / 1.2), 4, 12);

  if (points.length < 2) return;
  g.beginPath();
  points.forEach((v, i) => (i === 0 ? g.moveTo(x(i), y(v)) : g.lineTo(x(i), y(v))));
  g.strokeStyle = style.color;
  g.lineWidth = 2;
  g.stroke();
  g.lineTo(x(points.length - 1), y(0));
  g.lineTo(x(0), y(0));
  g.closePath();
  g.globalAlpha = 0.15;
  g.fillStyle = style.color;
  g.fill();
  g.globalAlpha = 1;
}

function renderRates() {
  for (const r of RATES) {
    const points = view.series[r.key];
    byId("rate-" + r.key).textContent = rate(points[points.length - 1]);
    drawChart(byId("chart-" + r.key), points);
  }
}

// -- queues, sessions, dead letters ----------------------------------------------------

function renderQueues(data) {
  view.queueTotal = data.total;
  byId("queues-total").textContent = count(data.total);
  const rows = data.queues.map((q) => tableRow([
    cell(q.app_name ?? q.app, q.app_name ? "" : "mono", q.app),
    cell(q.name, "mono"),
    cell(count(q.pending), "num"),
    cell(count(q.in_flight), "num"),
  ]));
  fill("queues-body", rows, 4, "no queues");

  const first = data.queues.length ? data.offset + 1 : 0;
  const last = data.offset + data.queues.length;
  byId("queues-range").textContent = first + "–" + last + " of " + count(data.total);
  byId("queues-prev").disabled = data.offset === 0;
  byId("queues-next").disabled = last >= data.total;
}

function renderSessions(data) {
  byId("sessions-total").textContent = count(data.total);
  byId("sessions-shown").textContent =
    data.total > data.sessions.length ? "first " + data.sessions.length : "";
  const rows = data.sessions.map((s) => tableRow([
    cell(s.client_id, "mono"),
    cell(s.app_name ?? s.app, "", s.app),
    cell(s.node, "mono"),
    badge(s.status, s.status),
    cell(count(s.in_flight), "num"),
    s.status === "disconnected"
      ? cell("closed " + ago(s.closed_ms), "", s.reason)
      : cell(ago(s.last_active_ms), "", utc(s.last_active_ms)),
  ]));
  fill("sessions-body", rows, 6, "no sessions");
}

// -- trace ---------------------------------------------------------------------------

function traceDetails(row) {
  return Object.entries(row)
    .filter(([k]) => k !== "what" && k !== "at")
    .map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : v))
    .join("  ");
}

async function refreshTrace() {
  const idem = view.traceIdem;
  if (!idem) return;
  const { status, body } = await getJson("/admin/trace/" + encodeURIComponent(idem));
  if (idem !== view.traceIdem) return; // another idem was asked for meanwhile
  const summary = byId("trace-summary");
  if (status !== 200) {
    summary.textContent = status === 404
      ? "No event " + idem + " on this node (or not applied here yet)."
      : "Trace failed: HTTP " + status;
    fill("trace-body", [], 3, "–");
    return;
  }
  summary.textContent = body.name + " · to app " + body.to + " · " + body.state +
    " · attempts " + body.attempts;
  const rows = body.history.map((h) => tableRow([
    cell(utc(h.at), "mono"),
    cell(h.what, "what"),
    cell(traceDetails(h), "mono small"),
  ]));
  fill("trace-body", rows, 3, "no audit rows");
}

// -- polling ----------------------------------------------------------------------------

function showProblem(text) {
  const problem = byId("problem");
  problem.textContent = text;
  problem.hidden = !text;
}

function signedOut() {
  if (view.leaving) return;
  view.leaving = true;
  location.assign("/"); // the node answers with its sign-in page
}

async function refresh() {
  const queuePath = "/admin/queues?limit=" + QUEUE_PAGE_ROWS + "&offset=" + view.queueOffset;
  const [cluster, sessions, queues, dlq] = await Promise.all([
    getJson("/admin/cluster"),
    getJson("/admin/sessions?limit=" + SESSION_ROWS_MAX),
    getJson(queuePath),
    getJson("/admin/dlq?limit=1"),
  ]);
  const failed = [cluster, sessions, queues, dlq].filter((r) => r.status !== 200);

  if (cluster.status === 200) {
    renderCluster(cluster.body);
    sampleRates(cluster.body.nodes, Date.now());
    renderRates();
  }
  if (sessions.status === 200) renderSessions(sessions.body);
  if (queues.status === 200) renderQueues(queues.body);
  if (dlq.status === 200) byId("dlq-total").textContent = count(dlq.body.total);
  await refreshTrace();

  showProblem(failed.length ? "Some reads failed (HTTP " +
    failed.map((r) => r.status).join(", ") + "); showing what answered." : "");
  byId("updated").textContent = "Last update " + utc(Date.now()) + " UTC.";
}

async function tick() {
  try {
    if (!document.hidden) await refresh();
  } catch (err) {
    if (err instanceof SignedOut) return signedOut();
    showProblem("Cannot reach this node: " + err.message);
  }
  setTimeout(tick, POLL_MS);
}

function moveQueuePage(direction) {
  const next = view.queueOffset + direction * QUEUE_PAGE_ROWS;
  view.queueOffset = Math.max(0, Math.min(next, view.queueTotal - 1));
  view.queueOffset -= view.queueOffset % QUEUE_PAGE_ROWS;
  getJson("/admin/queues?limit=" + QUEUE_PAGE_ROWS + "&offset=" + view.queueOffset)
    .then((r) => r.status === 200 && renderQueues(r.body))
    .catch((err) => (err instanceof SignedOut ? signedOut() : showProblem(err.message)));
}

function start() {
  byId("queues-prev").addEventListener("click", () => moveQueuePage(-1));
  byId("queues-next").addEventListener("click", () => moveQueuePage(1));
  byId("trace-form").addEventListener("submit", (event) => {
    event.preventDefault();
    view.traceIdem = byId("trace-idem").value.trim();
    byId("trace-summary").textContent = view.traceIdem ? "Loading…" : "";
    fill("trace-body", [], 3, "–");
    refreshTrace().catch((err) =>
      err instanceof SignedOut ? signedOut() : showProblem(err.message));
  });
  tick();
}

start();
