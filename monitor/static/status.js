// The hamta monitor's status page: reads the monitor's JSON API and draws with uPlot (vendored).
// Everything the page shows comes through `sources` below: checks, uptime, history, incidents
// (with their timelines) and maintenance windows as the monitor's API returns them; the
// cluster's nodes once a monitor serves them (until then the page says it does not).
"use strict";

const RANGES = ["24h", "7d", "30d", "90d"];
const REFRESH_MS = 10_000;
const charts = {};
let range = "24h";

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

// A route this monitor may not serve yet: null on 404, the JSON otherwise.
async function optionalJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (response.status === 404) return null;
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

// ------------------------------------------------------------------ data layer

// The incidents as /api/incidents lists them, each with its timeline from /api/incidents/{id}.
async function incidentsWithTimelines() {
  const listed = await getJson("/api/incidents");
  return Promise.all(listed.incidents.map((i) => getJson(`/api/incidents/${i.id}`)));
}

const sources = {
  checks: () => getJson("/api/checks").then((r) => r.checks),
  uptime: () => getJson("/api/uptime"),
  history: (name) => getJson(`/api/checks/${encodeURIComponent(name)}/history?range=${range}`),
  incidents: incidentsWithTimelines,
  maintenance: () => getJson("/api/maintenance").then((r) => r.maintenance),
  // Not served yet (the cluster awareness comes later): null on 404.
  cluster: () => optionalJson("/api/cluster"),
};

// ------------------------------------------------------------------- drawing

const when = (t) => new Date(t * 1000).toLocaleString("en-GB", { hour12: false });
function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["min", 60]]) {
    if (seconds >= size) return `${(seconds / size).toFixed(1)} ${unit}`;
  }
  return `${seconds.toFixed(1)} s`;
}
const percent = (ratio) => (ratio === null ? "–" : `${(ratio * 100).toFixed(3)} %`);

function cell(tr, value, className) {
  const td = document.createElement("td");
  td.textContent = value;
  if (className) td.className = className;
  tr.append(td);
  return td;
}

function drawChecks(checks, uptime) {
  const byName = Object.fromEntries(uptime.checks.map((c) => [c.name, c.ranges]));
  const body = document.querySelector("#checks tbody");
  body.replaceChildren();
  for (const check of checks) {
    const tr = document.createElement("tr");
    tr.dataset.check = check.name;
    tr.dataset.state = check.state;
    cell(tr, check.name);
    cell(tr, check.kind);
    const state = document.createElement("span");
    state.className = `badge ${check.state}`;
    state.textContent = check.state;
    cell(tr, "").append(state);
    cell(tr, check.since ? when(check.since) : "–");
    cell(tr, check.last ? `${check.last.seconds.toFixed(3)} s` : "–");
    // Each check location's verdict (a monitor with [cluster]): which see it up, which down.
    const where = cell(tr, check.locations ? "" : "–", "locations");
    for (const [location, seen] of Object.entries(check.locations || {})) {
      const badge = document.createElement("span");
      badge.className = `badge ${seen}`;
      badge.dataset.location = location;
      badge.dataset.state = seen;
      badge.textContent = `${location}: ${seen}`;
      where.append(badge, " ");
    }
    for (const name of RANGES) {
      const figures = byName[check.name]?.[name];
      // All of the known time in a maintenance window: say so rather than a bare dash.
      const held = figures?.ratio === null && figures.maintenance_s > 0;
      const td = cell(tr, held ? "maintenance" : percent(figures?.ratio ?? null), "uptime");
      td.dataset.range = name;
      if (figures) {
        td.dataset.ratio = String(figures.ratio);
        td.dataset.serving = String(figures.serving_s);
        td.dataset.failing = String(figures.failing_s);
        td.dataset.maintenance = String(figures.maintenance_s);
        td.title = `unknown: ${duration(figures.unknown_s) || "0 s"}, `
          + `maintenance: ${duration(figures.maintenance_s) || "0 s"} (both left out)`;
      }
    }
    body.append(tr);
  }
  const bad = checks.filter((c) => c.state === "down" || c.state === "expired");
  const slow = checks.filter((c) => c.state === "degraded" || c.state === "warning");
  const overall = document.getElementById("overall");
  overall.className = `badge ${bad.length ? "down" : slow.length ? "degraded" : "up"}`;
  overall.textContent = bad.length ? `${bad.length} of ${checks.length} down`
    : slow.length ? `${slow.length} degraded` : "all up";
}

function drawChart(name, history) {
  let box = document.getElementById(`chart-${name}`);
  if (!box) {
    box = document.createElement("div");
    box.id = `chart-${name}`;
    box.className = "chart";
    const title = document.createElement("h3");
    title.textContent = name;
    box.append(title);
    document.getElementById("charts").append(box);
  }
  const s = history.series;
  const data = [s.t, s.mean_s, s.max_s];
  const width = Math.max(320, box.clientWidth);
  if (!charts[name]) {
    charts[name] = new uPlot({
      width, height: 160,
      // Points too: a bucket between two empty ones has no line to draw.
      series: [{}, { label: "mean s", stroke: "#2b6cb0", width: 2, points: { show: true, size: 5 } },
        { label: "max s", stroke: "#c05621", width: 1, points: { show: true, size: 3 } }],
      axes: [{}, { size: 50 }],
      scales: { y: { range: (u, min, max) => [0, Math.max(0.01, (max ?? 0) * 1.2)] } },
    }, data, box);
  } else {
    charts[name].setData(data);
  }
  box.dataset.points = String(s.mean_s.filter((v) => v !== null).length);
  box.dataset.range = history.range;
}

function drawList(id, items, empty, draw) {
  const list = document.getElementById(id);
  list.replaceChildren();
  if (!items.length) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = empty;
    list.append(li);
    return;
  }
  for (const item of items) list.append(draw(item));
}

function incidentItem(incident) {
  const li = document.createElement("li");
  const open = incident.resolved === null;
  li.className = open ? "incident ongoing" : "incident resolved";
  li.dataset.id = String(incident.id);
  li.dataset.opened = String(incident.opened);
  li.dataset.resolved = String(incident.resolved);
  li.dataset.severity = incident.severity;
  li.dataset.state = incident.state;
  li.dataset.ackedBy = incident.acked_by ?? "";
  li.dataset.maintenance = incident.maintenance ?? "";
  const head = document.createElement("b");
  head.textContent = `#${incident.id} ${incident.check} ${incident.state}`;
  const severity = document.createElement("span");
  severity.className = `badge ${incident.severity === "critical" ? "down" : "degraded"}`;
  severity.textContent = incident.severity;
  const facts = [
    `opened ${when(incident.opened)}`,
    open ? "ongoing" : `resolved ${when(incident.resolved)}`
      + ` (${duration(incident.resolved - incident.opened)})`,
  ];
  if (incident.acked_by) facts.push(`acknowledged by ${incident.acked_by}`);
  if (incident.maintenance) facts.push(`in maintenance (${incident.maintenance})`);
  if (incident.locations) facts.push(`seen from ${incident.locations.join(", ")}`);
  li.dataset.locations = (incident.locations || []).join(",");
  const span = document.createElement("span");
  span.className = "muted facts";
  span.textContent = ` ${facts.join(", ")}`;
  const detail = document.createElement("div");
  detail.className = "muted";
  detail.textContent = incident.detail;
  const steps = document.createElement("ol");
  steps.className = "steps";
  for (const step of incident.timeline) {
    const s = document.createElement("li");
    s.dataset.event = step.event;
    s.textContent = `${when(step.at)} ${step.event}: ${step.detail}`;
    steps.append(s);
  }
  li.append(head, " ", severity, span, detail, steps);
  if (open && !incident.acked_by) li.append(ackForm(incident.id));
  return li;
}

// Acknowledge through the API (a JSON POST: a form of another site cannot send one).
function ackForm(id) {
  const form = document.createElement("form");
  form.className = "ack";
  const name = document.createElement("input");
  name.name = "by";
  name.required = true;
  name.placeholder = "your name";
  name.setAttribute("aria-label", `acknowledge incident ${id} as`);
  const button = document.createElement("button");
  button.type = "submit";
  button.textContent = "acknowledge";
  const said = document.createElement("span");
  said.className = "muted";
  form.append(name, " ", button, " ", said);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const response = await fetch(`/api/incidents/${id}/ack`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ by: name.value.trim() }),
    });
    if (response.ok) refresh();
    else said.textContent = `not acknowledged: ${await response.text()}`;
  });
  return form;
}

function maintenanceItem(window_) {
  const li = document.createElement("li");
  li.className = window_.active ? "maintenance active" : "maintenance";
  li.dataset.name = window_.name;
  const checks = window_.checks === "all" ? "all checks" : window_.checks.join(", ");
  const every = window_.recurring
    ? ` every ${window_.days.join(", ")} ${window_.time} ${window_.timezone},` : "";
  // A pause of the cluster has no end: it lasts until `hamta cluster resume`.
  const end = window_.end === null ? "until resume" : when(window_.end);
  const next = window_.start === null ? "no occurrence to come"
    : `${window_.active ? "now" : "next"}: ${when(window_.start)} – ${end}`;
  const who = window_.by ? `, by ${window_.by}` : "";
  const why = window_.reason ? `: ${window_.reason}` : "";
  li.textContent = `${window_.name} (${checks}):${every} ${next}${who}${why}`;
  li.dataset.by = window_.by ?? "";
  return li;
}

function drawCluster(cluster) {
  const box = document.getElementById("cluster");
  box.replaceChildren();
  const nodes = cluster?.nodes || [];
  if (!nodes.length) {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = cluster === null
      ? "This monitor does not report the cluster's nodes and roles yet."
      : "No nodes reported.";
    box.append(p);
    return;
  }
  const table = document.createElement("table");
  for (const node of nodes) {
    const tr = document.createElement("tr");
    cell(tr, node.name);
    cell(tr, node.role || "");
    cell(tr, node.state || "");
    table.append(tr);
  }
  box.append(table);
}

async function refresh() {
  try {
    const [checks, uptime, incidents, maintenance, cluster] = await Promise.all([
      sources.checks(), sources.uptime(), sources.incidents(), sources.maintenance(),
      sources.cluster(),
    ]);
    drawChecks(checks, uptime);
    // Not while someone types a name to acknowledge with: the redraw would wipe it.
    if (!document.activeElement?.matches("#incidents form.ack input")) {
      drawList("incidents", incidents, "none", incidentItem);
    }
    drawList("maintenance", maintenance, "none", maintenanceItem);
    drawCluster(cluster);
    const histories = await Promise.all(checks.map((c) => sources.history(c.name)));
    checks.forEach((c, i) => drawChart(c.name, histories[i]));
    document.getElementById("updated").textContent = `updated ${when(uptime.now)}`;
    document.body.dataset.now = String(uptime.now);
    document.body.dataset.loaded = "yes";
  } catch (error) {
    document.getElementById("updated").textContent = `cannot read the monitor: ${error.message}`;
  }
}

for (const button of document.querySelectorAll("#ranges button")) {
  button.addEventListener("click", () => {
    range = button.dataset.range;
    for (const b of document.querySelectorAll("#ranges button")) b.classList.toggle("on", b === button);
    refresh();
  });
}
refresh();
setInterval(refresh, REFRESH_MS);
