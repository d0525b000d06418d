// The hamta relay's dashboard: polls the admin endpoint and draws with uPlot (vendored).
"use strict";

const charts = {};
const fmt = new Intl.NumberFormat("en", { maximumFractionDigits: 2 });

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

function text(id, value) { document.getElementById(id).textContent = value; }

function chart(id, series, data) {
  const element = document.getElementById(id);
  const width = Math.max(320, element.clientWidth);
  if (!charts[id]) {
    charts[id] = new uPlot({
      width, height: 220,
      series: [{}, ...series.map(([label, stroke]) => ({ label, stroke, width: 2, spanGaps: false }))],
      axes: [{}, { size: 60 }],
      scales: { y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
    }, data, element);
  } else {
    charts[id].setSize({ width, height: 220 });
    charts[id].setData(data);
  }
  element.dataset.points = String(data[0].length);
}

function bars(id, counts) {
  const element = document.getElementById(id);
  const entries = Object.entries(counts).filter(([, n]) => n > 0);
  element.replaceChildren();
  if (!entries.length) {
    element.innerHTML = '<p class="empty">none yet</p>';
    return;
  }
  const top = Math.max(...entries.map(([, n]) => n));
  for (const [label, n] of entries) {
    const row = document.createElement("div");
    row.className = "row";
    row.dataset.label = label;
    row.innerHTML = `<span></span><div class="bar"></div><span class="n"></span>`;
    row.children[0].textContent = label;
    row.children[1].style.width = `${(100 * n) / top}%`;
    row.children[2].textContent = fmt.format(n);
    element.append(row);
  }
}

function rows(id, items, cells) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren();
  for (const item of items) {
    const tr = document.createElement("tr");
    for (const cell of cells(item)) {
      const td = document.createElement("td");
      td.textContent = cell;
      tr.append(td);
    }
    body.append(tr);
  }
}

async function refresh() {
  const [history, queue, node, domains] = await Promise.all([
    getJson("/api/history"), getJson("/api/queue"), getJson("/api/node"), getJson("/api/domains"),
  ]);
  text("node", node.node);
  const role = node.fenced ? "fenced" : node.state;
  const badge = document.getElementById("role");
  badge.textContent = role;
  badge.className = `badge ${role}`;
  text("epoch", node.epoch == null ? "" : `epoch ${node.epoch}`);
  text("updated", `updated ${new Date().toLocaleTimeString()}`);
  text("kpi-depth", fmt.format(queue.depth));
  text("kpi-rate", fmt.format(queue.delivery_rate_per_s));
  text("kpi-bounce", `${fmt.format(100 * queue.bounce_rate)} %`);
  text("kpi-flight", fmt.format(queue.in_flight));
  text("kpi-conns", fmt.format(queue.connections));

  const s = history.series;
  chart("chart-depth", [["queued", "#1f6fb2"]], [s.t, s.depth]);
  chart("chart-rates", [
    ["received", "#5a6b8c"], ["delivered", "#1f8a4c"], ["deferred", "#d68910"], ["bounced", "#c0392b"],
  ], [s.t, s.received_per_s, s.delivered_per_s, s.deferred_per_s, s.bounced_per_s]);
  bars("bounce-classes", history.bounces_by_class);
  bars("bounce-codes", history.bounces_by_code);

  const bouncing = domains.domains
    .filter((d) => d.hard_bounces + d.soft_bounces > 0)
    .sort((a, b) => (b.hard_bounces + b.soft_bounces) - (a.hard_bounces + a.soft_bounces))
    .slice(0, 10);
  rows("top-bouncing", bouncing, (d) => [
    d.domain, d.queued, d.hard_bounces, d.soft_bounces, `${fmt.format(100 * d.hard_bounce_rate)} %`,
    d.suspended ? "suspended" : d.throttled ? "throttled" : "",
  ]);
  rows("failovers", node.activations, (a) => [
    new Date(a.at * 1000).toLocaleString(), a.node, a.epoch ?? "", a.recovered_messages,
    `${fmt.format(a.seconds)} s`,
  ]);
  document.body.dataset.refreshed = String(Date.now());
  return history.interval_s;
}

async function loop() {
  let interval = 5;
  try {
    interval = await refresh();
    document.body.dataset.error = "";
  } catch (error) {
    document.body.dataset.error = String(error);
    text("updated", `not updated: ${error}`);
  }
  setTimeout(loop, Math.min(interval, 5) * 1000);
}

loop();
