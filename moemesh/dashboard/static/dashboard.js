// Live charts of the mesh: polls /api/points (new chart points since the last one) and /api/totals (tenant tables,
// expert heat map) every second. Each chart card carries data-points = its non-empty values, which the browser test
// reads to tell a chart with data from an empty one.
"use strict";

const COLORS = ["#1565c0", "#c62828", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f", "#5d4037", "#ad1457"];
const pct = (v) => (v == null ? null : 100 * v);
const q3 = (h) => ({ p50: h.p50, p95: h.p95, p99: h.p99 });

// id, tier, title, unit, and what to plot from one point: {series label: value}
const CHARTS = [
  ["qps", "tier1", "Requests per second", "req/s", (p) => ({ "chat req/s": p.qps })],
  ["errors", "tier1", "Error rate by gRPC code", "%", (p) => {
    const out = { "all errors": pct(p.error_rate) };
    for (const [code, r] of Object.entries(p.errors)) out[code] = p.qps > 0 ? 100 * r / p.qps : 0;
    return out;
  }],
  ["ttft", "tier1", "Time to first token", "s", (p) => q3(p.ttft)],
  ["itl", "tier1", "Inter-token latency", "s", (p) => q3(p.itl)],
  ["e2e", "tier1", "End-to-end latency", "s", (p) => q3(p.e2e)],
  ["tps", "tier1", "Tokens per second", "tok/s", (p) => p.tokens_per_s],
  ["batch", "tier1", "Batch size and queue depth", "sequences",
    (p) => ({ "mean batch": p.batch_size, running: p.running, queued: p.queue_depth })],
  ["kv", "tier1", "KV-cache use", "%", (p) => ({ "KV blocks used": pct(p.kv_cache) })],
  ["finish", "tier2", "Requests finished by finish_reason", "req/s", (p) => p.finish_rate],
  ["satisfaction", "tier2", "Satisfaction per tenant (mean rating 1-5)", "rating", (p) => p.satisfaction],
  ["completion", "tier2", "Task completion per tenant (feedback)", "% yes",
    (p) => Object.fromEntries(Object.entries(p.completion).map(([t, v]) => [t, pct(v)]))],
  ["spend", "tier3", "Price vs cost of goods", "$/hour",
    (p) => ({ "price (charged)": p.price_usd_h, "cost of goods": p.cost_usd_h })],
  ["util", "tier3", "Router busy and CPU per service", "% (CPU: of one core)", (p) => {
    const out = { "router busy": pct(p.router_busy) };
    for (const [job, cores] of Object.entries(p.cpu)) out[`${job} CPU`] = 100 * cores;
    return out;
  }],
  ["mtok", "tier3", "Price and cost per million tokens", "$/M tok",
    (p) => ({ price: p.per_mtok.price, "cost of goods": p.per_mtok.cost })],
  ["shards", "tier3", "Shard balance: Forward time per shard", "% of wall time",
    (p) => Object.fromEntries(Object.entries(p.shards).map(([s, v]) => [s, pct(v)]))],
];

class Chart {
  constructor(id, tier, title, unit, pick) {
    Object.assign(this, { id, unit, pick, xs: [], cols: {}, plot: null });
    this.card = document.createElement("div");
    this.card.className = "card";
    this.card.id = `chart-${id}`;
    this.card.dataset.points = "0";
    this.card.innerHTML = `<h3>${title} <small>${unit}</small></h3><div class="now"></div><div class="plot"></div>`;
    document.getElementById(tier).appendChild(this.card);
  }

  add(point) {
    const values = this.pick(point) || {};
    let rebuild = !this.plot;
    for (const label of Object.keys(values)) {
      if (!(label in this.cols)) { this.cols[label] = this.xs.map(() => null); rebuild = true; }
    }
    this.xs.push(point.t);
    for (const [label, col] of Object.entries(this.cols)) col.push(values[label] ?? null);
    return rebuild;
  }

  render(rebuild) {
    const labels = Object.keys(this.cols);
    const data = [this.xs, ...labels.map((l) => this.cols[l])];
    if (rebuild) {
      if (this.plot) this.plot.destroy();
      const series = [{}, ...labels.map((l, i) => ({ label: l, stroke: COLORS[i % COLORS.length], width: 1.5,
                                                     spanGaps: false }))];
      const clock = (u, ticks) => ticks.map((t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false }));
      this.plot = new uPlot({ width: this.card.clientWidth - 16, height: 170, series, legend: { live: false },
                              axes: [{ values: clock, space: 70 }, { size: 52 }], scales: { x: { time: true } } },
                            data, this.card.querySelector(".plot"));
    } else {
      this.plot.setData(data);
    }
    const filled = labels.reduce((n, l) => n + this.cols[l].filter((v) => v != null).length, 0);
    this.card.dataset.points = String(filled);
    const now = labels.map((l) => `${l}: ${fmt(this.cols[l][this.cols[l].length - 1])}`).join(" · ");
    this.card.querySelector(".now").textContent = now;
  }
}

function fmt(v) {
  if (v == null) return "–";
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 100 ? v.toFixed(0) : a >= 1 ? v.toFixed(2) : a >= 0.001 ? v.toFixed(4) : v.toExponential(2);
}

const charts = CHARTS.map((c) => new Chart(...c));
let since = 0;

async function getJSON(path) {
  const r = await fetch(path, { credentials: "same-origin" });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

function drawServices(up) {
  const el = document.getElementById("services");
  el.innerHTML = Object.entries(up).sort().map(([job, ok]) =>
    `<span class="pill ${ok ? "up" : "down"}">${job}</span>`).join("");
}

function money(v) { return v == null ? "–" : `$${fmt(v)}`; }
function pctText(v) { return v == null ? "–" : `${(100 * v).toFixed(0)}%`; }

function drawTables(tenants) {
  const reasons = [...new Set(tenants.flatMap((t) => Object.keys(t.finish)))].sort();
  document.getElementById("quality").innerHTML =
    `<tr><th>tenant</th>${reasons.map((r) => `<th>finish: ${r}</th>`).join("")}<th>task completed</th>` +
    `<th>satisfaction (1-5)</th><th>quota rejections</th></tr>` +
    tenants.map((t) => `<tr><td>${t.tenant}</td>${reasons.map((r) => `<td>${fmt(t.finish[r] ?? 0)}</td>`).join("")}` +
      `<td>${pctText(t.task_completion)}</td><td>${t.satisfaction == null ? "–" : t.satisfaction.toFixed(2)}</td>` +
      `<td>${fmt(t.quota_rejections)}</td></tr>`).join("");
  document.getElementById("money").innerHTML =
    "<tr><th>tenant</th><th>tokens</th><th>price</th><th>cost of goods</th><th>margin</th><th>margin %</th>" +
    "<th>price / M tok</th><th>cost / M tok</th><th>month spent / budget</th></tr>" +
    tenants.map((t) => {
      const share = t.budget_usd ? t.month_spent_usd / t.budget_usd : null;
      const bar = share == null ? "" :
        `<span class="bar${share >= 0.8 ? " hot" : ""}" style="width:${Math.min(60, 60 * share)}px"></span>`;
      return `<tr><td>${t.tenant}</td><td>${fmt(t.tokens)}</td><td>${money(t.price_usd)}</td>` +
        `<td>${money(t.cost_usd)}</td><td>${money(t.margin_usd)}</td>` +
        `<td>${t.margin_pct == null ? "–" : t.margin_pct.toFixed(1) + "%"}</td>` +
        `<td>${money(t.price_per_mtok)}</td><td>${money(t.cost_per_mtok)}</td>` +
        `<td>${money(t.month_spent_usd)} / ${t.budget_usd ? money(t.budget_usd) : "unlimited"} ` +
        `${share == null ? "" : pctText(share)}${bar}</td></tr>`;
    }).join("");
}

function drawHeat(h) {
  const canvas = document.getElementById("heat");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const rows = h.tokens.length;
  const ch = rows > 12 ? 14 : 34;  // a 48-layer model still fits on a screen
  canvas.height = 24 + ch * Math.max(1, rows);
  document.getElementById("heat-card").dataset.points = String(h.tokens.flat().filter((v) => v > 0).length);
  if (!rows) { ctx.fillText("no expert routing yet", 10, 20); return; }
  const left = 150, top = 18, cw = Math.min(60, (canvas.width - left - 10) / h.experts);
  const max = Math.max(1, ...h.tokens.flat());
  ctx.font = "11px system-ui";
  for (let e = 0; e < h.experts; e++) if (cw >= 40) ctx.fillText(`expert ${e}`, left + e * cw + 4, 12);
  h.tokens.forEach((row, i) => {
    const y = top + i * ch;
    const imb = h.imbalance[i] == null ? "–" : h.imbalance[i].toFixed(2);
    ctx.fillStyle = "#1d2330";
    ctx.fillText(`layer ${h.layers[i]} (max/mean ${imb})`, 2, y + ch / 2 + 4);
    row.forEach((v, e) => {
      const heat = v / max;  // white (idle) -> dark red (the busiest expert of the model)
      ctx.fillStyle = `rgb(${255 - 75 * heat}, ${255 - 230 * heat}, ${255 - 230 * heat})`;
      ctx.fillRect(left + e * cw, y, cw - 2, ch - 2);
      ctx.fillStyle = heat > 0.55 ? "#fff" : "#1d2330";
      if (cw >= 40 && ch >= 20) ctx.fillText(fmt(v), left + e * cw + 4, y + ch / 2 + 4);
    });
  });
}

async function refresh() {
  try {
    const { points } = await getJSON(`/api/points?since=${since}`);
    const rebuild = new Set();
    for (const p of points) for (const c of charts) if (c.add(p)) rebuild.add(c);
    if (points.length) {
      since = points[points.length - 1].t;
      for (const c of charts) c.render(rebuild.has(c));
    }
    const totals = await getJSON("/api/totals");
    drawServices(totals.up);
    drawTables(totals.tenants);
    drawHeat(totals.experts);
    document.getElementById("error").textContent = totals.error || "";
    document.getElementById("clock").textContent = new Date().toLocaleTimeString();
    document.body.dataset.updates = String(1 + Number(document.body.dataset.updates || 0));
  } catch (err) {
    document.getElementById("error").textContent = String(err);
  }
  setTimeout(refresh, 1000);
}

refresh();
