// Snapbright regional health dashboard: renders /api/v1/events (server-sent events) live.
//
// Every string shown here may come from a remote cluster (service and cluster names,
// explanations), so the page only ever creates elements and sets textContent or attributes
// it names itself: never innerHTML.

const SVG_NS = "http://www.w3.org/2000/svg";
const STALE_AFTER_S = Number(
  document.querySelector('meta[name="snapbright-stale-after"]')?.content ?? 10,
);
const TIMELINE_SHOWN = 50;
const FRESH_MS = 8000;
// Distinct from the status colours (green / amber / red) so a cluster never reads as a state.
const PALETTE = ["#2563eb", "#9333ea", "#0891b2", "#db2777", "#475569", "#a16207", "#4f46e5"];
const STATUS = {
  healthy: { icon: "✓", word: "Healthy" },
  degraded: { icon: "▲", word: "Degraded" },
  unreachable: { icon: "✕", word: "Unreachable" },
};

const view = {
  state: null,
  decisions: new Map(), // id -> decision
  freshSince: new Map(), // id -> time it arrived live
  lastEventAt: 0,
  firstState: true,
  colours: new Map(),
};

// --- DOM helpers: text only ---

function el(tag, options = {}, ...children) {
  const node = document.createElement(tag);
  applyOptions(node, options);
  node.append(...children.filter((c) => c !== null && c !== undefined).map(asChild));
  return node;
}

function asChild(child) {
  return child instanceof Node ? child : document.createTextNode(String(child));
}

function applyOptions(node, options) {
  for (const [key, value] of Object.entries(options)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.setAttribute("class", value);
    else if (key === "text") node.textContent = String(value);
    else if (key === "data") for (const [k, v] of Object.entries(value)) node.dataset[k] = String(v);
    else node.setAttribute(key, String(value));
  }
}

function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  applyOptions(node, attributes);
  node.append(...children.map(asChild));
  return node;
}

// --- Formatting ---

function ms(value) {
  if (value === null || value === undefined) return "—";
  if (value >= 1000) return `${(value / 1000).toFixed(2)} s`;
  return `${value >= 100 ? value.toFixed(0) : value.toFixed(1)} ms`;
}

function pct(share, digits = 0) {
  const value = share * 100;
  if (value > 0 && value < 1) return `${value.toFixed(1)}%`;
  return `${value.toFixed(digits)}%`;
}

function successText(rate) {
  if (rate === null || rate === undefined) return "—";
  const value = rate * 100;
  return `${value >= 99.95 ? value.toFixed(2) : value.toFixed(1)}%`;
}

function rateText(rate) {
  return rate >= 100 ? rate.toFixed(0) : rate.toFixed(1);
}

function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
}

function colourOf(cluster) {
  return view.colours.get(cluster) ?? "#64748b";
}

function assignColours(state) {
  const names = new Set(state.regions.map((r) => r.name));
  for (const route of state.routes) for (const w of route.weights) names.add(w.cluster);
  const local = state.cluster;
  const ordered = [...names].sort((a, b) => (a === local ? -1 : b === local ? 1 : a < b ? -1 : a > b ? 1 : 0));
  for (const name of ordered) {
    if (!view.colours.has(name)) view.colours.set(name, PALETTE[view.colours.size % PALETTE.length]);
  }
}

function sortedClusters(clusters, local) {
  return [...clusters].sort((a, b) => (a === local ? -1 : b === local ? 1 : a < b ? -1 : a > b ? 1 : 0));
}

// --- Sections ---

function renderHeader(state) {
  document.getElementById("cluster").textContent = state.cluster;
  document.title = `${state.cluster} · Snapbright regional health`;
}

function renderRegions(state) {
  const fromHere = new Map(state.rtt.filter((l) => l.from === state.cluster).map((l) => [l.to, l]));
  const regions = sortedClusters(state.regions.map((r) => r.name), state.cluster)
    .map((name) => state.regions.find((r) => r.name === name));
  const cards = regions.map((region) => {
    const status = STATUS[region.status] ?? { icon: "?", word: region.status };
    const link = fromHere.get(region.name);
    return el(
      "article",
      { class: `region-card status-${region.status}`, data: { region: region.name, status: region.status } },
      el(
        "div",
        { class: "region-top" },
        el("span", { class: "status-icon", "aria-hidden": "true", text: status.icon }),
        el("span", { class: "region-name", text: region.name }),
        region.local ? el("span", { class: "local-tag", text: "this cluster" }) : null,
      ),
      el("div", { class: "status-line" },
        el("span", { class: "status-word", text: status.word }),
        link ? el("span", { class: "region-rtt" }, link.alive ? `${ms(link.rttMs)} away` : "gateway not answering") : null),
      el("div", { class: "region-detail", text: region.detail }),
    );
  });
  if (cards.length === 0) cards.push(el("p", { class: "empty", text: "No regions known yet." }));
  document.getElementById("regions").replaceChildren(...cards);
}

function renderRtt(state) {
  const names = sortedClusters(new Set([
    ...state.regions.map((r) => r.name),
    ...state.rtt.flatMap((l) => [l.from, l.to]),
  ]), state.cluster);
  const links = new Map(state.rtt.map((l) => [`${l.from}\u0000${l.to}`, l]));
  const head = el("tr", {}, el("th", { scope: "col", class: "corner", text: "from \\ to" }),
    ...names.map((n) => el("th", { scope: "col", text: n })));
  const rows = names.map((from) =>
    el("tr", {}, el("th", { scope: "row", text: from }),
      ...names.map((to) => {
        if (from === to) return el("td", { class: "self", text: "·" });
        const link = links.get(`${from}\u0000${to}`);
        if (!link) return el("td", { class: "unknown", title: "not probed from here", text: "—" });
        if (!link.alive) return el("td", { class: "down", data: { from, to }, text: "✕ down" });
        return el("td", { class: rttClass(link.rttMs), data: { from, to }, text: ms(link.rttMs) });
      })),
  );
  const table = el("table", { class: "matrix" }, el("thead", {}, head), el("tbody", {}, ...rows));
  document.getElementById("rtt").replaceChildren(table);
}

function rttClass(value) {
  if (value >= 200) return "far";
  if (value >= 100) return "mid";
  return "near";
}

function renderServices(state) {
  const callers = new Set(state.services.map((s) => s.caller));
  const showCaller = callers.size > 1;
  const rows = [];
  const services = [...state.services].sort((a, b) =>
    a.service === b.service
      ? (a.region === state.cluster ? -1 : b.region === state.cluster ? 1 : a.region.localeCompare(b.region))
      : a.service.localeCompare(b.service));
  let previous = null;
  for (const s of services) {
    const first = s.service !== previous;
    previous = s.service;
    const degraded = new Set(s.degraded);
    const metric = (key, text) =>
      el("td", { class: `num${degraded.has(key) ? " bad" : ""}`, data: { metric: key } },
        degraded.has(key) ? el("span", { class: "flag", "aria-label": "past threshold", text: "▲ " }) : null,
        text);
    rows.push(el(
      "tr",
      { class: first ? "group-start" : null, data: { service: s.service, region: s.region } },
      el("th", { scope: "row", class: "service-name" }, first ? s.service : "",
        showCaller ? el("span", { class: "caller", text: ` from ${s.caller}` }) : null),
      el("td", { class: "region-cell" },
        el("span", { class: "swatch", "aria-hidden": "true", data: { cluster: s.region } }),
        s.region, s.region === state.cluster ? el("span", { class: "local-mark", text: " local" }) : null,
        sourceMark(s)),
      metric("p50", ms(s.p50Ms)),
      metric("p95", ms(s.p95Ms)),
      metric("p99", ms(s.p99Ms)),
      metric("successRate", successText(s.successRate)),
      metric("requestRate", rateText(s.requestRate)),
    ));
  }
  if (rows.length === 0) rows.push(el("tr", {}, el("td", { colspan: 7, class: "empty", text: "No statistics yet." })));
  const body = document.querySelector("#services tbody");
  body.replaceChildren(...rows);
  for (const swatch of body.querySelectorAll(".swatch")) swatch.style.backgroundColor = colourOf(swatch.dataset.cluster);
}

function sourceMark(row) {
  // Figures not measured by our callers say whose they are.
  if (row.source === "peer") {
    return el("span", { class: "source-mark", title: `as ${row.region} reports it: its own callers, without the network between`, text: " reported" });
  }
  if (row.source === "probes") {
    return el("span", { class: "source-mark", title: `${row.region}'s copy is idle: latency from its probes of its endpoints`, text: " probes" });
  }
  return null;
}

function renderWeights(state) {
  const total = state.totalWeight;
  const blocks = state.routes.map((route) => {
    const shares = sortedClusters(route.weights.map((w) => w.cluster), route.caller)
      .map((c) => route.weights.find((w) => w.cluster === c));
    const bar = el("div", { class: "bar", role: "img", "aria-label": shares.map((w) => `${w.cluster} ${pct(w.weight / total)}`).join(", ") });
    for (const w of shares) {
      if (w.weight <= 0) continue;
      const share = w.weight / total;
      const segment = el("div", { class: "segment", data: { cluster: w.cluster, weight: w.weight }, title: `${w.cluster}: ${pct(share, 1)}` },
        share >= 0.08 ? el("span", { text: `${w.cluster} ${pct(share)}` }) : null);
      segment.style.width = `${share * 100}%`;
      segment.style.backgroundColor = colourOf(w.cluster);
      bar.append(segment);
    }
    const legend = el("ul", { class: "legend" }, ...shares.map((w) => {
      const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
      swatch.style.backgroundColor = colourOf(w.cluster);
      return el("li", { class: w.weight > 0 ? null : "zero" }, swatch, `${w.cluster} `, el("strong", { text: pct(w.weight / total, 1) }));
    }));
    return el(
      "div",
      { class: `route mode-${route.mode}`, data: { service: route.service, caller: route.caller } },
      el("div", { class: "route-head" },
        el("span", { class: "route-service", text: route.service }),
        el("span", { class: "route-caller", text: ` callers in ${route.caller}` }),
        el("span", { class: "mode", text: route.mode.replace("-", " ") })),
      bar,
      legend,
    );
  });
  if (blocks.length === 0) blocks.push(el("p", { class: "empty", text: "No routes decided yet." }));
  document.getElementById("weights").replaceChildren(...blocks);
}

function renderCharts(state) {
  const now = state.generatedAt;
  const figures = state.series.map((series) => el(
    "figure",
    { class: "chart-pair", data: { service: series.service, caller: series.caller } },
    el("figcaption", {}, el("strong", { text: series.service }), ` from ${series.caller}`),
    el("div", { class: "chart-row" },
      lineChart("Expected latency", series.latencyMs, now, series.caller, ms, axisMs, null),
      lineChart("Share of traffic", series.weights, now, series.caller, pct, pct, 1)),
  ));
  if (figures.length === 0) figures.push(el("p", { class: "empty", text: "No history yet." }));
  document.getElementById("charts").replaceChildren(...figures);
}

function axisMs(value) {
  // Three significant digits, trailing zeros dropped: a 0.5 ms grid line reads 0.5 ms, not 1 ms.
  if (value >= 1000) return `${Number((value / 1000).toPrecision(3))} s`;
  return `${Number(value.toPrecision(3))} ms`;
}

function lineChart(title, byCluster, now, local, format, axisFormat, fixedMax) {
  const W = 400, H = 118, left = 50, right = 8, top = 8, bottom = 18;
  const clusters = sortedClusters(Object.keys(byCluster), local);
  const all = clusters.flatMap((c) => byCluster[c]);
  const start = all.length ? Math.min(...all.map((p) => p[0])) : now - 60;
  // The newest point may be a little ahead of the snapshot's clock (ticks run on the loop).
  const end = Math.max(now, start + 1, ...all.map((p) => p[0]));
  const max = fixedMax ?? niceMax(Math.max(0.1, ...all.map((p) => p[1])));
  const x = (t) => left + ((t - start) / (end - start)) * (W - left - right);
  const y = (v) => top + (1 - v / max) * (H - top - bottom);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
  for (const f of [0, 0.5, 1]) {
    const v = max * f;
    chart.append(svg("line", { x1: left, x2: W - right, y1: y(v), y2: y(v), class: "grid" }));
    chart.append(svg("text", { x: left - 4, y: y(v) + 3, class: "axis", "text-anchor": "end" }, axisFormat(v)));
  }
  const span = end - start;
  chart.append(svg("text", { x: left, y: H - 4, class: "axis" }, span >= 90 ? `−${Math.round(span / 60)} min` : `−${Math.round(span)} s`));
  chart.append(svg("text", { x: W - right, y: H - 4, class: "axis", "text-anchor": "end" }, "now"));
  for (const cluster of clusters) {
    const points = byCluster[cluster];
    if (points.length === 0) continue;
    const line = svg("polyline", {
      points: points.map(([t, v]) => `${x(t).toFixed(1)},${y(Math.min(v, max)).toFixed(1)}`).join(" "),
      class: "series",
      stroke: colourOf(cluster),
      data: { cluster },
    });
    line.append(svg("title", {}, cluster));
    chart.append(line);
  }
  const legend = el("ul", { class: "legend small" }, ...clusters.map((c) => {
    const points = byCluster[c];
    const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
    swatch.style.backgroundColor = colourOf(c);
    return el("li", {}, swatch, `${c} `, el("strong", { text: points.length ? format(points[points.length - 1][1]) : "—" }));
  }));
  return el("div", { class: "chart-box" }, el("div", { class: "chart-title", text: title }), chart, legend);
}

function niceMax(value) {
  const magnitude = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * magnitude >= value) return step * magnitude;
  return 10 * magnitude;
}

function renderTimeline() {
  const select = document.getElementById("timeline-service");
  const services = new Set([...view.decisions.values()].map((d) => d.service));
  for (const route of view.state?.routes ?? []) services.add(route.service);
  const options = [...services].sort();
  const chosen = select.value;
  const existing = [...select.options].slice(1).map((o) => o.value);
  if (existing.join("\u0000") !== options.join("\u0000")) {
    select.replaceChildren(el("option", { value: "", text: "all services" }),
      ...options.map((s) => el("option", { value: s, text: s })));
    select.value = options.includes(chosen) ? chosen : "";
  }
  const shown = [...view.decisions.values()]
    .filter((d) => !select.value || d.service === select.value)
    .sort((a, b) => b.id - a.id)
    .slice(0, TIMELINE_SHOWN);
  const now = Date.now();
  const items = shown.map((d) => {
    const arrived = view.freshSince.get(d.id);
    const fresh = arrived !== undefined && now - arrived < FRESH_MS;
    const kind = d.transition ?? (d.rule.startsWith("failback") ? "back" : d.rule === "hold" || d.rule === "exit-pending" ? "wait" : "away");
    return el(
      "li",
      { class: `decision kind-${kind}${fresh ? " fresh" : ""}`, data: { decisionId: d.id, rule: d.rule, service: d.service } },
      el("div", { class: "decision-head" },
        el("time", { datetime: new Date(d.at * 1000).toISOString(), text: clock(d.at) }),
        el("span", { class: "rule", text: d.rule }),
        el("span", { class: "decision-service", text: d.service }),
        d.transition ? el("span", { class: "transition", text: d.transition === "away" ? "↗ away" : "↩ back" }) : null),
      weightChange(d),
      el("p", { class: "explanation", text: d.explanation }),
    );
  });
  if (items.length === 0) items.push(el("li", { class: "empty", text: "No decisions yet: traffic is where it started." }));
  document.getElementById("timeline").replaceChildren(...items);
}

function weightChange(d) {
  const before = new Map(d.previousWeights.map((w) => [w.cluster, w.weight]));
  const changed = d.weights.filter((w) => (before.get(w.cluster) ?? 0) !== w.weight);
  if (changed.length === 0) return el("div", { class: "weights-change unchanged", text: "weights unchanged" });
  const total = view.state?.totalWeight ?? 10000;
  return el("div", { class: "weights-change" }, ...sortedClusters(changed.map((w) => w.cluster), d.caller).map((cluster) => {
    const w = changed.find((c) => c.cluster === cluster);
    const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
    swatch.style.backgroundColor = colourOf(cluster);
    return el("span", { class: "change" }, swatch, `${cluster} `,
      el("span", { class: "old", text: pct((before.get(cluster) ?? 0) / total, 1) }), " → ",
      el("strong", { text: pct(w.weight / total, 1) }));
  }));
}

// --- Live data ---

function onState(state) {
  view.state = state;
  assignColours(state);
  for (const d of state.decisions) {
    if (!view.decisions.has(d.id)) {
      view.decisions.set(d.id, d);
      if (!view.firstState) view.freshSince.set(d.id, Date.now());
    }
  }
  trimDecisions();
  view.firstState = false;
  renderHeader(state);
  renderRegions(state);
  renderRtt(state);
  renderServices(state);
  renderWeights(state);
  renderCharts(state);
  renderTimeline();
  document.body.dataset.version = String(state.version);
}

function onDecision(decision) {
  if (!view.decisions.has(decision.id)) {
    view.decisions.set(decision.id, decision);
    view.freshSince.set(decision.id, Date.now());
    trimDecisions();
    if (view.state) renderTimeline();
  }
}

function trimDecisions() {
  const ids = [...view.decisions.keys()].sort((a, b) => b - a);
  for (const id of ids.slice(TIMELINE_SHOWN * 4)) {
    view.decisions.delete(id);
    view.freshSince.delete(id);
  }
}

let source = null;
let attempt = 0;
let retryAt = 0;

function connect() {
  const url = new URL("api/v1/events", document.baseURI);
  const newest = Math.max(0, ...view.decisions.keys());
  if (newest > 0) url.searchParams.set("after", String(newest));
  source = new EventSource(url);
  setConnection("connecting");
  source.addEventListener("open", () => setConnection("live"));
  source.addEventListener("state", (event) => {
    attempt = 0;
    heard();
    onState(JSON.parse(event.data));
  });
  source.addEventListener("decision", (event) => {
    heard();
    onDecision(JSON.parse(event.data));
  });
  source.addEventListener("error", () => {
    // Our own backoff, not EventSource's fixed retry: close and come back later.
    source.close();
    const delay = Math.min(30000, 1000 * 2 ** attempt) * (0.75 + Math.random() / 2);
    attempt = Math.min(attempt + 1, 6);
    retryAt = Date.now() + delay;
    setConnection("reconnecting");
    setTimeout(connect, delay);
  });
}

function heard() {
  view.lastEventAt = Date.now();
  setConnection("live");
}

function setConnection(status) {
  const box = document.getElementById("connection");
  box.dataset.status = status;
  tick();
}

function tick() {
  const box = document.getElementById("connection");
  const label = document.getElementById("connection-label");
  const updated = document.getElementById("updated");
  const now = Date.now();
  const quiet = view.lastEventAt ? (now - view.lastEventAt) / 1000 : null;
  let status = box.dataset.status;
  if (status === "live" && quiet !== null && quiet > STALE_AFTER_S) status = box.dataset.status = "stale";
  if (status === "stale" && quiet !== null && quiet <= STALE_AFTER_S) status = box.dataset.status = "live";
  const words = {
    connecting: "Connecting…",
    live: "Live",
    stale: "Stale",
    reconnecting: `Reconnecting in ${Math.max(0, Math.ceil((retryAt - now) / 1000))} s`,
  };
  label.textContent = words[status] ?? status;
  updated.textContent = quiet === null ? "" : `updated ${quiet < 1.5 ? "just now" : `${Math.round(quiet)} s ago`}`;
}

setInterval(() => {
  tick();
  // Let the "fresh" highlight of new decisions fade.
  if ([...view.freshSince.values()].some((t) => Date.now() - t > FRESH_MS && Date.now() - t < FRESH_MS + 1100)) renderTimeline();
}, 1000);
document.getElementById("timeline-service").addEventListener("change", renderTimeline);
connect();
