// modelhost dashboard: what every page shares. Plain script, no build step.
"use strict";
const Dash = (() => {
  const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
  const prefix = meta("prefix");
  const csrf = meta("csrf-token");
  const listeners = {};
  let source = null;

  // A call to the admin API (path under /api/admin) or /v1 through the session bridge.
  async function call(method, path, body, opts = {}) {
    const headers = { "X-CSRF-Token": csrf };
    let payload = body;
    if (body !== undefined && !(body instanceof FormData)) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    const resp = await fetch(prefix + path, { method, headers, body: payload,
                                              credentials: "same-origin", signal: opts.signal });
    if (resp.status === 401) { location.href = prefix + "/login?next=" + encodeURIComponent(location.pathname); }
    if (opts.raw) return resp;
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = { text }; }
    if (!resp.ok) {
      const err = new Error((data && data.error && data.error.message) || resp.statusText);
      err.status = resp.status; err.body = data;
      throw err;
    }
    return data;
  }
  const admin = (method, path, body, opts) => call(method, "/api" + path, body, opts);
  const v1 = (method, path, body, opts) => call(method, "/v1" + path, body, opts);

  // One event stream per page: the snapshot, then state changes, download progress, ticks.
  function on(kind, fn) { (listeners[kind] = listeners[kind] || []).push(fn); connect(); }
  function connect() {
    if (source) return;
    source = new EventSource(prefix + "/events");
    const live = document.getElementById("live");
    source.onopen = () => live && live.classList.add("on");
    source.onerror = () => live && live.classList.remove("on");
    for (const kind of ["snapshot", "state", "download", "tick", "traffic", "rollout"]) {
      source.addEventListener(kind, (ev) => {
        const data = JSON.parse(ev.data);
        for (const fn of listeners[kind] || []) fn(data);
        for (const fn of listeners["*"] || []) fn(kind, data);
      });
    }
  }

  function toast(text, bad) {
    const el = document.getElementById("toast");
    el.textContent = text; el.className = bad ? "show bad" : "show";
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { el.className = ""; }, bad ? 8000 : 3000);
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  const bytes = (n) => {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0; while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return `${n.toFixed(n < 10 && i ? 1 : 0)} ${units[i]}`;
  };
  const seconds = (s) => {
    if (s === null || s === undefined || !isFinite(s)) return "–";
    s = Math.round(s);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  };
  const num = (v, d = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));

  // A small uPlot line chart that follows its container's width.
  function chart(container, series, opts = {}) {
    const width = () => Math.max(260, container.clientWidth - 8);
    const plot = new uPlot({
      width: width(), height: opts.height || 180,
      scales: { x: { time: true }, ...(opts.y ? { y: { range: opts.y } } : {}) },
      axes: [{}, { size: 64 }],
      legend: { live: false },
      series: [{}, ...series.map((s, i) => ({ label: s, stroke: COLORS[i % COLORS.length], width: 1.5,
                                              spanGaps: false }))],
    }, [[], ...series.map(() => [])], container);
    new ResizeObserver(() => plot.setSize({ width: width(), height: opts.height || 180 })).observe(container);
    // The x axis covers at least `opts.span` seconds up to now, so that a chart with a few
    // points shows them in time rather than stretched over the whole width.
    const setData = plot.setData.bind(plot);
    plot.setData = (data) => {
      setData(data);
      const now = Date.now() / 1000, span = opts.span || 600, xs = data[0];
      plot.setScale("x", { min: Math.min(xs.length ? xs[0] : now, now - span),
                           max: Math.max(xs.length ? xs[xs.length - 1] : now, now) });
    };
    plot.setData([[], ...series.map(() => [])]);
    return plot;
  }
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];

  // Every page follows the stream (its live mark; the traffic history grows while one is open).
  document.addEventListener("DOMContentLoaded", connect);

  return { prefix, csrf, call, admin, v1, on, toast, el, bytes, seconds, num, chart, COLORS };
})();
