// GPUs page: one tile per GPU with live charts (memory, utilisation, temperature, power).
"use strict";
(() => {
  const { on, el, bytes, chart, num } = Dash;
  const tiles = new Map(); // index -> {figures, charts, data}
  const KEEP = 300;
  const $ = (id) => document.getElementById(id);

  on("snapshot", (d) => {
    show(d.gpus);
    for (const g of d.gpus.gpus) {
      const t = tile(g);
      for (const h of g.history || []) push(t, { ...g, taken_at: h.t, memory_used: h.memory_used,
        utilization_gpu: h.utilization_gpu, temperature_c: h.temperature_c, power_w: null });
      push(t, g);  // the latest sample, power included (the history has none)
      update(t, g);
    }
  });
  on("tick", (d) => { show(d.gpus); for (const g of d.gpus.gpus) { const t = tile(g); push(t, g); update(t, g); } });

  function show(info) {
    const none = !info.gpus.length;
    $("no-gpu").hidden = !none;
    if (none) $("no-gpu").textContent = "No GPU on this machine: every model runs on the CPU." +
      (info.reason ? ` (${info.reason})` : "") + (info.error ? ` Last error: ${info.error}` : "");
  }
  function tile(g) {
    let t = tiles.get(g.index);
    if (t) return t;
    const figures = el("div", { class: "gpu-figures" });
    const models = el("p", { class: "hint" });
    const boxes = ["Memory used (GB)", "Utilisation (%)", "Temperature (°C)", "Power (W)"].map((label) =>
      el("div", {}, el("div", { class: "hint", text: label }), el("div", { class: "chart" })));
    const card = el("section", { class: "card gpu", "data-gpu": g.index },
      el("h2", { text: `GPU ${g.index}: ${g.name}` }), figures, models,
      el("div", { class: "gpu-charts" }, ...boxes));
    $("gpus").append(card);
    t = { figures, models, data: [[], [], [], [], []], charts: null, boxes };
    // Five minutes: the monitor's own history (150 samples, every 2 s).
    const ranges = [[0, g.memory_total / 1e9], [0, 100], null, g.power_limit_w ? [0, g.power_limit_w] : null];
    t.charts = boxes.map((b, i) => chart(b.lastChild, [["memory", "util", "temp", "power"][i]],
                                         { height: 140, span: 300, y: ranges[i] || undefined }));
    tiles.set(g.index, t);
    return t;
  }
  function push(t, g) {
    const row = [g.taken_at, g.memory_used / 1e9, g.utilization_gpu, g.temperature_c, g.power_w];
    row.forEach((v, i) => { t.data[i].push(v); if (t.data[i].length > KEEP) t.data[i].shift(); });
    t.charts.forEach((c, i) => c.setData([t.data[0], t.data[i + 1]]));
  }
  function update(t, g) {
    t.figures.replaceChildren(
      el("span", {}, "Memory ", el("b", { text: `${bytes(g.memory_used)} / ${bytes(g.memory_total)}` })),
      el("span", {}, "Utilisation ", el("b", { text: g.utilization_gpu == null ? "–" : `${g.utilization_gpu} %` })),
      el("span", {}, "Temperature ", el("b", { text: g.temperature_c == null ? "–" : `${g.temperature_c} °C` })),
      el("span", {}, "Power ", el("b", { text: g.power_w == null ? "–" : `${num(g.power_w, 0)} W` +
        (g.power_limit_w ? ` / ${num(g.power_limit_w, 0)} W` : "") })));
    t.models.textContent = g.models.length ? `Models: ${g.models.join(", ")}` : "No model on this GPU";
  }
})();
