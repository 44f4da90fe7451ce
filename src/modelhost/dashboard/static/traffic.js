// Traffic page: live samples (requests/s, latency, overhead, TTFT, tokens/s, errors), and the
// usage table by the hour (the admin API's /usage).
"use strict";
(() => {
  const { on, el, admin, chart, num } = Dash;
  const $ = (id) => document.getElementById(id);
  const samples = [];
  let charts = null;

  on("snapshot", (d) => { samples.splice(0, samples.length, ...d.traffic); redraw(); });
  on("traffic", (s) => { samples.push(s); if (samples.length > 720) samples.shift(); redraw(); });
  on("tick", (d) => {
    const select = $("traffic-model");
    const have = new Set([...select.options].map((o) => o.value));
    for (const m of d.models) if (!have.has(m.id)) select.append(el("option", { value: m.id, text: m.id }));
  });
  $("traffic-model").addEventListener("change", redraw);

  function value(s, key, how) {
    const want = $("traffic-model").value;
    const rows = Object.entries(s.models).filter(([id]) => !want || id === want).map(([, r]) => r);
    const vals = rows.map((r) => r[key]).filter((v) => v !== null && v !== undefined);
    if (!vals.length) return how === "sum" ? 0 : null;
    return how === "sum" ? vals.reduce((a, b) => a + b, 0) : Math.max(...vals);
  }
  function redraw() {
    if (!charts) charts = {
      rps: chart($("chart-rps"), ["requests/s"]),
      latency: chart($("chart-latency"), ["p50", "p95", "p99"]),
      overhead: chart($("chart-overhead"), ["overhead"]),
      ttft: chart($("chart-ttft"), ["ttft p50"]),
      tokens: chart($("chart-tokens"), ["tokens/s"]),
    };
    const t = samples.map((s) => s.t);
    charts.rps.setData([t, samples.map((s) => value(s, "rps", "sum"))]);
    charts.latency.setData([t, ...["p50", "p95", "p99"].map((k) => samples.map((s) => value(s, k, "max")))]);
    charts.overhead.setData([t, samples.map((s) => value(s, "overhead_ms", "max"))]);
    charts.ttft.setData([t, samples.map((s) => value(s, "ttft_p50", "max"))]);
    charts.tokens.setData([t, samples.map((s) => value(s, "tokens_per_s", "sum"))]);
    const errors = new Map();
    for (const s of samples) for (const [id, r] of Object.entries(s.models))
      for (const [kind, n] of Object.entries(r.errors || {})) errors.set(`${id}\u0000${kind}`, (errors.get(`${id}\u0000${kind}`) || 0) + n);
    const rows = [...errors.entries()].map(([k, n]) => { const [id, kind] = k.split("\u0000");
      return el("tr", {}, el("td", { text: id }), el("td", { text: kind }), el("td", { text: String(n) })); });
    $("errors").tBodies[0].replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 3, class: "hint", text: "No errors in the samples." }))]));
  }

  async function usage() {
    const since = new Date(Date.now() - 24 * 3600e3).toISOString();
    try {
      const byKey = await admin("GET", `/usage?group_by=key,model&since=${encodeURIComponent(since)}`);
      $("usage").tBodies[0].replaceChildren(...byKey.data.map((r) => el("tr", {},
        ...[r.key_id, r.model, r.requests, r.prompt_tokens, r.completion_tokens, num(r.audio_seconds, 1), r.embedding_inputs]
          .map((v) => el("td", { text: String(v) })))));
      const byHour = await admin("GET", `/usage?group_by=model,hour&since=${encodeURIComponent(since)}`);
      const models = [...new Set(byHour.data.map((r) => r.model))];
      const hours = [...new Set(byHour.data.map((r) => Date.parse(r.start) / 1000))].sort();
      const box = $("chart-hours"); box.replaceChildren();
      if (!hours.length) { box.append(el("p", { class: "hint", text: "No usage recorded in the last 24 hours." })); return; }
      const plot = chart(box, models.map((m) => `${m} tokens/s`), { span: 24 * 3600 });
      plot.setData([hours, ...models.map((m) => hours.map((h) => {
        const r = byHour.data.find((x) => x.model === m && Date.parse(x.start) / 1000 === h);
        return r ? (r.completion_tokens / 3600) : 0; }))]);
    } catch (e) { Dash.toast("Usage: " + e.message, true); }
  }
  usage();
  setInterval(usage, 60000);
})();
