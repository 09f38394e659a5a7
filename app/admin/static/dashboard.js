// The usage dashboard: reads /admin/reports/* with the admin key kept in sessionStorage,
// and draws every chart as inline SVG. Data reaches the page only as text nodes and
// attributes, never as markup. Each bar carries data-label and data-value for tests.
"use strict";

const KEY = "gateway-admin-key";
const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 640;
const $ = (id) => document.getElementById(id);

const integer = (n) => Math.round(n).toLocaleString("en-US");
const usd = (n) => "$" + (n >= 100 ? n.toFixed(0) : n >= 1 ? n.toFixed(2) : n.toFixed(4));

function addDays(day, n) {
  const d = new Date(day + "T00:00:00Z");
  d.setUTCDate(d.getUTCDate() + n);
  return d.toISOString().slice(0, 10);
}

function daysOf(start, end) {
  const days = [];
  for (let day = start; day <= end; day = addDays(day, 1)) days.push(day);
  return days;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function report(path, params) {
  const url = new URL("reports/" + path, location.href);
  url.search = new URLSearchParams(params).toString();
  const response = await fetch(url, {
    headers: { Authorization: "Bearer " + sessionStorage.getItem(KEY), Accept: "application/json" },
    cache: "no-store",
  });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, body?.error?.message || `HTTP ${response.status}`);
  return body;
}

function node(parent, name, attributes = {}, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  parent.appendChild(element);
  return element;
}

function reset(svg, height) {
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${WIDTH} ${height}`);
}

function bar(svg, item, box, format) {
  const rect = node(svg, "rect", {
    class: "bar", x: box.x, y: box.y, width: Math.max(box.width, 0), height: Math.max(box.height, 0),
    "data-label": item.label, "data-value": String(item.value),
  });
  node(rect, "title", {}, `${item.label}: ${format(item.value)}`);
}

// Vertical bars, one per day of the range (missing days are zero).
function columnChart(svg, points, format) {
  const height = 200, left = 56, right = 8, top = 10, bottom = 22;
  reset(svg, height);
  const max = Math.max(0, ...points.map((p) => p.value));
  const plotHeight = height - top - bottom;
  const step = (WIDTH - left - right) / Math.max(points.length, 1);
  node(svg, "line", { class: "axis", x1: left, x2: WIDTH - right, y1: top + plotHeight, y2: top + plotHeight });
  node(svg, "text", { class: "tick", x: left - 6, y: top + 8, "text-anchor": "end" }, format(max));
  node(svg, "text", { class: "tick", x: left - 6, y: top + plotHeight, "text-anchor": "end" }, format(0));
  points.forEach((point, i) => {
    const h = max > 0 ? (point.value / max) * plotHeight : 0;
    const x = left + i * step;
    bar(svg, point, { x: x + step * 0.1, y: top + plotHeight - h, width: step * 0.8, height: h }, format);
  });
  if (max === 0) {
    node(svg, "text", { class: "empty", x: (WIDTH + left) / 2, y: top + plotHeight / 2, "text-anchor": "middle" },
      "Nothing in this range.");
  }
  const labelled = points.length > 1 ? [0, Math.floor((points.length - 1) / 2), points.length - 1] : [0];
  for (const i of new Set(labelled)) {
    if (!points[i]) continue;
    node(svg, "text", { class: "tick", x: left + (i + 0.5) * step, y: height - 6, "text-anchor": "middle" },
      points[i].label.slice(5));
  }
}

// Horizontal bars, largest first, for named things (models, users, limits).
function barChart(svg, items, format) {
  const row = 24, left = 170, right = 90;
  if (!items.length) {
    reset(svg, 40);
    node(svg, "text", { class: "empty", x: WIDTH / 2, y: 24, "text-anchor": "middle" }, "Nothing in this range.");
    return;
  }
  reset(svg, items.length * row + 8);
  const max = Math.max(...items.map((item) => item.value));
  items.forEach((item, i) => {
    const y = 4 + i * row;
    const label = item.label.length > 26 ? item.label.slice(0, 25) + "…" : item.label;
    node(svg, "text", { class: "label", x: left - 8, y: y + 15, "text-anchor": "end" }, label);
    const width = max > 0 ? (item.value / max) * (WIDTH - left - right) : 0;
    bar(svg, item, { x: left, y: y + 3, width, height: row - 6 }, format);
    node(svg, "text", { class: "value", x: left + width + 6, y: y + 15 }, format(item.value));
  });
}

function total(id, value, format) {
  const element = $(id);
  element.textContent = format(value);
  element.dataset.value = String(value);
}

function render(range, byDay, byModel, topUsers, refusals) {
  const days = new Map(byDay.data.map((row) => [row.day, row]));
  const series = (pick) => daysOf(range.start, range.end).map((day) => {
    const row = days.get(day);
    return { label: day, value: row ? pick(row) : 0 };
  });
  const totals = byDay.totals;
  total("total-requests", totals.requests, integer);
  total("total-tokens", totals.prompt_tokens + totals.completion_tokens, integer);
  total("total-cost", totals.cost_usd, usd);
  total("total-refusals", refusals.total, integer);
  columnChart($("requests-by-day"), series((row) => row.requests), integer);
  columnChart($("tokens-by-day"), series((row) => row.prompt_tokens + row.completion_tokens), integer);
  columnChart($("cost-by-day"), series((row) => row.cost_usd), usd);
  const models = byModel.data.map((row) => ({ label: row.model, value: row.cost_usd }));
  barChart($("cost-by-model"), models.sort((a, b) => b.value - a.value), usd);
  barChart($("top-users"), topUsers.data.map((row) => ({ label: row.user_id, value: row.cost_usd })), usd);
  barChart($("refusals-by-code"), refusals.by_code.map((row) => ({ label: row.code, value: row.refusals })), integer);
}

function setState(state, message = "") {
  document.body.dataset.state = state;
  $("status").textContent = message;
}

function lock(message = "") {
  sessionStorage.removeItem(KEY);
  $("login").hidden = false;
  $("range").hidden = true;
  $("report").hidden = true;
  setState(message ? "error" : "locked", message);
  $("admin-key").focus();
}

async function load() {
  const range = { start: $("start").value, end: $("end").value };
  $("login").hidden = true;
  $("range").hidden = false;
  setState("loading", "Loading…");
  try {
    const [byDay, byModel, topUsers, refusals] = await Promise.all([
      report("usage", { ...range, group_by: "day" }),
      report("usage", { ...range, group_by: "model" }),
      report("top-users", { ...range, limit: 10 }),
      report("refusals", range),
    ]);
    render(range, byDay, byModel, topUsers, refusals);
    $("report").hidden = false;
    setState("ready", `${range.start} to ${range.end} (UTC)`);
  } catch (error) {
    if (error instanceof ApiError && (error.status === 401 || error.status === 403)) lock(error.message);
    else setState("error", error.message);
  }
}

function start() {
  const today = new Date().toISOString().slice(0, 10);
  $("end").value = today;
  $("start").value = addDays(today, -29);
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("admin-key").value.trim();
    $("admin-key").value = "";
    if (!key) return;
    sessionStorage.setItem(KEY, key);
    load();
  });
  $("range").addEventListener("submit", (event) => {
    event.preventDefault();
    load();
  });
  $("forget").addEventListener("click", () => lock());
  if (sessionStorage.getItem(KEY)) load();
  else lock();
}

start();
