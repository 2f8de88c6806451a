// The status page's drawings (api/ui.py): model versions as an inline SVG plot, and the embedding map on a
// canvas from the projection a worker stored (worker/projection.py). Plain JavaScript, nothing fetched from
// elsewhere; every text that comes from data is set with textContent.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#2862b3", "#e8772e", "#2f9e5b", "#c8412f", "#8a5cc2", "#8c6239", "#d360a6", "#5f6b7a",
                 "#b5b82e", "#1fa5b8", "#6e8df0", "#f2b134"];
const NO_LABEL = "#b8c0cc";

function svg(tag, attrs, parent) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

function html(tag, attrs, parent, text) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  if (parent) parent.appendChild(el);
  return el;
}

function when(seconds) {
  const t = Number(seconds);
  return Number.isFinite(t) && t > 0 ? new Date(t * 1000).toLocaleString() : "";
}

function fmt(n) {
  return Number.isFinite(n) ? n.toLocaleString() : "—";
}

// -- model versions ---------------------------------------------------------------------------------

function drawVersions(points, plot, legend) {
  if (!points.length) {
    html("p", { class: "empty" }, plot, "No version yet.");
    return;
  }
  const tags = [];
  const metrics = [];
  for (const p of points) {
    for (const [tag, stats] of Object.entries(p.tags || {})) {
      if (!tags.includes(tag)) tags.push(tag);
      for (const m of Object.keys(stats.accuracy || {})) if (!metrics.includes(m)) metrics.push(m);
    }
  }
  const colour = (tag) => PALETTE[tags.indexOf(tag) % PALETTE.length];
  const dash = (metric) => "d" + (metrics.indexOf(metric) % 3);

  const W = 900, left = 56, right = 16, top1 = 22, h1 = 190, gap = 46, h2 = 140, bottom = 40;
  const top2 = top1 + h1 + gap;
  const H = top2 + h2 + bottom;
  const n = points.length;
  const xAt = (i) => left + (n === 1 ? (W - left - right) / 2 : (i * (W - left - right)) / (n - 1));
  const maxAnn = Math.max(1, ...points.map((p) => p.annotated || 0),
    ...points.flatMap((p) => Object.values(p.tags || {}).map((s) => s.annotated || 0)));
  const yAcc = (v) => top1 + h1 - v * h1;
  const yAnn = (v) => top2 + h2 - (v / maxAnn) * h2;

  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "model versions", id: "versions-svg" });
  const grid = svg("g", { class: "grid" }, root);
  const axes = svg("g", { class: "axis" }, root);
  for (const v of [0, 0.25, 0.5, 0.75, 1]) {
    svg("line", { x1: left, x2: W - right, y1: yAcc(v), y2: yAcc(v) }, grid);
    svg("text", { x: left - 6, y: yAcc(v) + 4, "text-anchor": "end" }, axes).textContent = v.toFixed(2);
  }
  const annTicks = niceTicks(maxAnn);
  for (const v of annTicks) {
    svg("line", { x1: left, x2: W - right, y1: yAnn(v), y2: yAnn(v) }, grid);
    svg("text", { x: left - 6, y: yAnn(v) + 4, "text-anchor": "end" }, axes).textContent = fmt(v);
  }
  svg("text", { x: left, y: top1 - 8, class: "panel-title" }, root).textContent = "cross-validated accuracy per tag";
  svg("text", { x: left, y: top2 - 8, class: "panel-title" }, root).textContent = "annotations (all, and per tag)";
  svg("line", { x1: left, x2: left, y1: top1, y2: top1 + h1 }, axes);
  svg("line", { x1: left, x2: left, y1: top2, y2: top2 + h2 }, axes);
  svg("line", { x1: left, x2: W - right, y1: top2 + h2, y2: top2 + h2 }, axes);
  const every = Math.max(1, Math.ceil(n / 16));
  points.forEach((p, i) => {
    if (i % every === 0 || i === n - 1) {
      svg("text", { x: xAt(i), y: top2 + h2 + 16, "text-anchor": "middle" }, axes).textContent = "v" + p.number;
    }
  });
  svg("text", { x: (left + W - right) / 2, y: H - 6, "text-anchor": "middle" }, axes).textContent =
    "model version (oldest to newest)";

  // One line per (tag, accuracy field), broken where a version lacks it; one per tag's annotation count.
  // Tags with equal values would hide each other: each tag's points sit a little apart (x is only an order).
  const nudge = (tag) => (tag === null ? 0 : (tags.indexOf(tag) - (tags.length - 1) / 2) * 5);
  const line = (values, yOf, cls, stroke, tag) => {
    let d = "", pen = false;
    values.forEach((v, i) => {
      if (v === null || v === undefined) { pen = false; return; }
      d += (pen ? "L" : "M") + (xAt(i) + nudge(tag)).toFixed(1) + " " + yOf(v).toFixed(1);
      pen = true;
    });
    if (d) svg("path", { d, class: "series " + cls, stroke }, root);
  };
  const dot = (i, y, fill, cls, series, title, tag) => {
    const c = svg("circle", { cx: (xAt(i) + nudge(tag)).toFixed(1), cy: y.toFixed(1), r: 3.5, fill,
                              class: "pt " + cls, "data-series": series, "data-version": points[i].version }, root);
    svg("title", {}, c).textContent = title;
  };
  for (const tag of tags) {
    for (const m of metrics) {
      const values = points.map((p) => (p.tags[tag] && p.tags[tag].accuracy[m] !== undefined ? p.tags[tag].accuracy[m] : null));
      if (values.every((v) => v === null)) continue;
      line(values, yAcc, dash(m), colour(tag), tag);
      values.forEach((v, i) => {
        if (v !== null) dot(i, yAcc(v), colour(tag), "acc", `${tag}:${m}`,
          `${points[i].version}\n${tag} ${m}: ${v.toFixed(3)}` + answered(points[i].tags[tag]), tag);
      });
    }
    const counts = points.map((p) => (p.tags[tag] && Number.isFinite(p.tags[tag].annotated) ? p.tags[tag].annotated : null));
    line(counts, yAnn, "d0", colour(tag), tag);
    counts.forEach((v, i) => {
      if (v !== null) dot(i, yAnn(v), colour(tag), "tag-ann", tag, `${points[i].version}\n${tag}: ${fmt(v)} annotated`, tag);
    });
  }
  const totals = points.map((p) => p.annotated || 0);
  line(totals, yAnn, "d0", "#1d2430", null);
  totals.forEach((v, i) => {
    const p = points[i];
    dot(i, yAnn(v), "#1d2430", "ann", "annotated",
      `${p.version}\n${when(p.created)}\nreason: ${p.reason}\n${fmt(v)} annotated, ${fmt(p.tasks)} tasks`, null);
  });
  plot.appendChild(root);

  const item = (parent, swatchClass, swatchColour, text) => {
    const span = html("span", {}, parent);
    const sw = html("span", { class: swatchClass }, span);
    if (swatchColour) sw.style[swatchClass === "sw" ? "background" : "borderTopColor"] = swatchColour;
    span.appendChild(document.createTextNode(text));
  };
  for (const tag of tags) item(legend, "sw", colour(tag), tag);
  for (const m of metrics) item(legend, "dash " + dash(m), null, m);
  item(legend, "sw", "#1d2430", "all annotations");
  root.dataset.versions = String(n);
}

function answered(stats) {
  return stats && stats.answered_by ? `\nanswered by: ${stats.answered_by}` : "";
}

function niceTicks(max) {
  const raw = max / 4;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let v = 0; v <= max + 1e-9; v += step) ticks.push(Math.round(v * 100) / 100);
  return ticks;
}

// -- the embedding map ------------------------------------------------------------------------------

class EmbeddingMap {
  constructor(canvas) {
    this.canvas = canvas;
    this.select = document.getElementById("map-tag");
    this.legend = document.getElementById("map-legend");
    this.info = document.getElementById("map-info");
    this.empty = document.getElementById("map-empty");
    this.tip = document.getElementById("map-tip");
    this.labelStudio = (canvas.dataset.labelStudio || "").replace(/\/+$/, "");
    this.map = null;
    this.pinned = -1;
    this.select.addEventListener("change", () => this.draw());
    canvas.addEventListener("mousemove", (e) => this.hover(e));
    canvas.addEventListener("mouseleave", () => { if (this.pinned < 0) this.tip.hidden = true; });
    canvas.addEventListener("click", (e) => this.click(e));
    window.addEventListener("resize", () => this.map && this.draw());
    document.getElementById("map-refresh").addEventListener("click", () => this.refresh());
  }

  async load() {
    const reply = await fetch(this.canvas.dataset.mapUrl, { credentials: "same-origin", cache: "no-cache" });
    if (reply.status === 404) {
      this.empty.hidden = false;
      this.canvas.dataset.state = "empty";
      return null;
    }
    if (!reply.ok) throw new Error(`map: HTTP ${reply.status}`);
    const map = await reply.json();
    this.empty.hidden = true;
    this.setMap(map);
    return map;
  }

  setMap(map) {
    this.map = map;
    const n = map.tasks.length;
    this.radius = n > 20000 ? 1.6 : n > 5000 ? 2.2 : n > 1000 ? 3 : 4;
    const previous = this.select.value;
    this.select.replaceChildren();
    let best = 0, bestCount = -1;
    map.tags.forEach((tag, i) => {
      html("option", { value: String(i) }, this.select, tag.name);
      const count = tag.codes.filter((c) => c >= 0).length;
      if (count > bestCount) { best = i; bestCount = count; }
    });
    const keep = map.tags.findIndex((t) => t.name === (this.select.options[previous] || {}).text);
    this.select.value = String(keep >= 0 ? keep : best);
    this.buildIndex();
    this.draw();
  }

  buildIndex() {
    // Points by cell of a 64x64 grid: a hover looks at a few cells, not at 50,000 points.
    const m = this.map;
    this.cell = (m.grid + 1) / 64;
    this.cells = new Map();
    for (let i = 0; i < m.tasks.length; i++) {
      const key = Math.floor(m.x[i] / this.cell) * 64 + Math.floor(m.y[i] / this.cell);
      if (!this.cells.has(key)) this.cells.set(key, []);
      this.cells.get(key).push(i);
    }
  }

  geometry() {
    const ratio = window.devicePixelRatio || 1;
    const size = this.canvas.clientWidth || 640;
    if (this.canvas.width !== Math.round(size * ratio)) {
      this.canvas.width = Math.round(size * ratio);
      this.canvas.height = Math.round(size * ratio);
    }
    const pad = 12;
    return { ratio, size, pad, scale: (size - 2 * pad) / this.map.grid };
  }

  toScreen(i, g) {
    return [g.pad + this.map.x[i] * g.scale, g.pad + (this.map.grid - this.map.y[i]) * g.scale];
  }

  colourOf(code) {
    return code < 0 ? NO_LABEL : PALETTE[code % PALETTE.length];
  }

  draw() {
    const started = performance.now();
    const m = this.map;
    const tag = m.tags[Number(this.select.value)] || { name: "", labels: [], codes: [] };
    const g = this.geometry();
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(g.ratio, 0, 0, g.ratio, 0, 0);
    ctx.clearRect(0, 0, g.size, g.size);
    const n = m.tasks.length;
    const code = (i) => (tag.codes.length ? tag.codes[i] : -1);
    // Unannotated first, one path per colour; annotated on top, larger and ringed.
    const byColour = new Map();
    const annotated = [];
    for (let i = 0; i < n; i++) {
      if (m.annotated[i]) { annotated.push(i); continue; }
      const c = code(i);
      if (!byColour.has(c)) byColour.set(c, []);
      byColour.get(c).push(i);
    }
    ctx.globalAlpha = n > 5000 ? 0.7 : 0.85;
    for (const [c, members] of byColour) {
      ctx.fillStyle = this.colourOf(c);
      ctx.beginPath();
      for (const i of members) {
        const [x, y] = this.toScreen(i, g);
        ctx.moveTo(x + this.radius, y);
        ctx.arc(x, y, this.radius, 0, 2 * Math.PI);
      }
      ctx.fill();
    }
    ctx.globalAlpha = 1;
    ctx.lineWidth = 1.5;
    ctx.strokeStyle = "#111";
    for (const i of annotated) {
      const [x, y] = this.toScreen(i, g);
      ctx.beginPath();
      ctx.arc(x, y, this.radius + 2, 0, 2 * Math.PI);
      ctx.fillStyle = this.colourOf(code(i));
      ctx.fill();
      ctx.stroke();
    }
    if (this.pinned >= 0) this.ring(this.pinned, g, ctx);
    this.drawLegend(tag, annotated.length);
    const explained = (m.explained || []).map((v) => (100 * v).toFixed(0) + "%").join(" / ");
    const stale = m.version !== document.getElementById("current-version").textContent;
    this.info.textContent = `${fmt(n)} points` + (m.total > n ? ` (a sample of ${fmt(m.total)} tasks)` : "") +
      ` · ${String(m.method || "").toUpperCase()}, axes explain ${explained} of the variance · ${fmt(Object.keys(m.thumbs || {}).length)} thumbnails` +
      ` · made for ${m.version} at ${when(m.computed)}` + (stale ? " (a newer version exists: the map follows it after its refit)" : "");
    this.canvas.dataset.drawMs = (performance.now() - started).toFixed(1);
    this.canvas.dataset.drawn = String(n);
    this.canvas.dataset.annotated = String(annotated.length);
    this.canvas.dataset.state = "drawn";
  }

  ring(i, g, ctx) {
    const [x, y] = this.toScreen(i, g);
    ctx.beginPath();
    ctx.arc(x, y, this.radius + 5, 0, 2 * Math.PI);
    ctx.lineWidth = 2;
    ctx.strokeStyle = "#2862b3";
    ctx.stroke();
  }

  drawLegend(tag, annotatedCount) {
    this.legend.replaceChildren();
    const counts = new Map();
    for (const c of tag.codes) counts.set(c, (counts.get(c) || 0) + 1);
    html("b", {}, this.legend, tag.name || "no tag");
    const row = (colour, text, count, ringed) => {
      const span = html("span", {}, this.legend);
      const sw = html("span", { class: "sw" }, span);
      sw.style.background = colour;
      if (ringed) sw.style.border = "2px solid #111";
      span.appendChild(document.createTextNode(text + " "));
      html("span", { class: "count" }, span, fmt(count));
    };
    tag.labels.forEach((label, i) => { if (counts.get(i)) row(this.colourOf(i), label, counts.get(i)); });
    if (counts.get(-1)) row(NO_LABEL, "no suggestion", counts.get(-1));
    row("#ffffff", "annotated (ringed)", annotatedCount, true);
  }

  nearest(event) {
    const g = this.geometry();
    const rect = this.canvas.getBoundingClientRect();
    const px = event.clientX - rect.left, py = event.clientY - rect.top;
    const gx = (px - g.pad) / g.scale, gy = this.map.grid - (py - g.pad) / g.scale;
    const reach = Math.max(6, this.radius + 4) / g.scale;
    let best = -1, bestD = reach * reach;
    const c0 = Math.floor((gx - reach) / this.cell), c1 = Math.floor((gx + reach) / this.cell);
    const r0 = Math.floor((gy - reach) / this.cell), r1 = Math.floor((gy + reach) / this.cell);
    for (let cx = c0; cx <= c1; cx++) {
      for (let cy = r0; cy <= r1; cy++) {
        for (const i of this.cells.get(cx * 64 + cy) || []) {
          const d = (this.map.x[i] - gx) ** 2 + (this.map.y[i] - gy) ** 2;
          if (d < bestD) { best = i; bestD = d; }
        }
      }
    }
    return { index: best, px, py };
  }

  hover(event) {
    if (!this.map || this.pinned >= 0) return;
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      const { index, px, py } = this.nearest(event);
      if (index < 0) { this.tip.hidden = true; return; }
      this.showTip(index, px, py);
    });
  }

  click(event) {
    if (!this.map) return;
    const { index, px, py } = this.nearest(event);
    this.pinned = index === this.pinned ? -1 : index;
    this.tip.classList.toggle("pinned", this.pinned >= 0);
    if (index >= 0) this.showTip(index, px, py); else this.tip.hidden = true;
    this.draw();
  }

  showTip(i, px, py) {
    const m = this.map;
    const task = m.tasks[i];
    this.tip.replaceChildren();
    html("b", {}, this.tip, `Task ${task}`);
    const thumb = (m.thumbs || {})[String(task)];
    if (thumb) html("img", { src: thumb, alt: `task ${task}` }, this.tip);
    const kind = m.annotated[i] ? "annotated" : "suggested";
    for (const tag of m.tags) {
      const c = tag.codes[i];
      const div = html("div", {}, this.tip);
      html("span", { class: "k" }, div, `${tag.name} (${kind}): `);
      div.appendChild(document.createTextNode(c >= 0 ? tag.labels[c] : "—"));
    }
    if (this.labelStudio) {
      const link = html("a", { href: `${this.labelStudio}/projects/${m.project}/data?task=${task}`, target: "_blank",
                               rel: "noopener" }, this.tip, "open in Label Studio");
      link.title = this.pinned >= 0 ? "" : "click the point first to pin this box";
    }
    this.tip.hidden = false;
    const wrap = this.canvas.getBoundingClientRect();
    const x = Math.min(px + 14, wrap.width - 170), y = Math.max(0, py - 20);
    this.tip.style.left = `${x}px`;
    this.tip.style.top = `${y}px`;
  }

  async refresh() {
    const button = document.getElementById("map-refresh");
    button.disabled = true;
    const before = this.map ? this.map.computed : null;
    const reply = await fetch(this.canvas.dataset.refreshUrl, {
      method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" }, body: "{}",
    });
    this.info.textContent = reply.ok ? "Queued: a worker is recomputing the map…" : `Refused: HTTP ${reply.status}`;
    for (let tries = 0; reply.ok && tries < 60; tries++) {
      await new Promise((r) => setTimeout(r, 3000));
      const map = await this.load().catch(() => null);
      if (map && map.computed !== before) break;
    }
    button.disabled = false;
  }
}

// -- start ------------------------------------------------------------------------------------------

for (const el of document.querySelectorAll("time.when")) el.textContent = when(el.dataset.t);

const versionsData = document.getElementById("versions-data");
if (versionsData) {
  drawVersions(JSON.parse(versionsData.textContent), document.getElementById("versions-plot"),
    document.getElementById("versions-legend"));
}
const mapCanvas = document.getElementById("map");
if (mapCanvas) {
  const view = new EmbeddingMap(mapCanvas);
  view.load().catch((err) => {
    mapCanvas.dataset.state = "error";
    document.getElementById("map-info").textContent = String(err);
  });
}
