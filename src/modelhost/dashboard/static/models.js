// Models page: the table, one model's actions, download progress, history, log, spec form.
"use strict";
(() => {
  const { admin, on, toast, el, bytes, seconds, num, prefix } = Dash;
  const models = new Map();     // id -> card
  const traffic = new Map();    // id -> latest traffic sample of that model
  let gpus = [];
  let selected = null;
  let logSource = null;
  const $ = (id) => document.getElementById(id);
  const idPath = (id) => id.split("/").map(encodeURIComponent).join("/");

  on("snapshot", (d) => { gpus = d.gpus.gpus || []; setModels(d.models);
                          const last = d.traffic[d.traffic.length - 1]; if (last) setTraffic(last); });
  on("tick", (d) => { gpus = d.gpus.gpus || []; setModels(d.models); });
  on("traffic", setTraffic);
  on("state", (e) => {
    const card = models.get(e.model);
    if (card) { card.state = e.state; card.last_error = e.error; card.gpus = e.gpus; }
    render();
  });
  on("rollout", (e) => {
    const card = models.get(e.model);
    if (card) card.rollout = e;
    if (e.model === selected) { showDetail(); if ($("history-box").open) loadHistory(); }
  });
  on("download", (e) => {
    const card = models.get(e.model);
    if (card) { card.download = e; }
    if (selected === e.model) showDownload(card);
  });

  function setModels(list) {
    const seen = new Set();
    for (const m of list) { models.set(m.id, m); seen.add(m.id); }
    for (const id of [...models.keys()]) if (!seen.has(id)) models.delete(id);
    render();
  }
  function setTraffic(sample) {
    traffic.clear();
    for (const [id, row] of Object.entries(sample.models)) traffic.set(id, row);
    render();
  }

  function render() {
    const query = $("filter").value.trim().toLowerCase();
    const key = $("sort").value;
    const rows = [...models.values()].filter((m) => !query ||
      [m.id, m.state, m.backend, m.task, ...(m.aliases || [])].join(" ").toLowerCase().includes(query));
    const val = (m) => key === "rps" ? -((traffic.get(m.id) || {}).rps || 0)
      : key === "active" ? -(m.active_requests + m.queued_requests) : String(m[key] || "");
    rows.sort((a, b) => (val(a) < val(b) ? -1 : val(a) > val(b) ? 1 : a.id.localeCompare(b.id)));
    const body = $("models").tBodies[0];
    body.replaceChildren(...rows.map((m) => {
      const t = traffic.get(m.id) || {};
      const dl = m.state === "downloading" && m.download && m.download.bytes_total
        ? ` ${Math.floor(100 * m.download.bytes_done / m.download.bytes_total)} %` : "";
      return el("tr", { "data-model": m.id, onclick: () => select(m.id) },
        el("td", {}, el("b", { text: m.id }), el("div", { class: "hint", text: m.task })),
        el("td", {}, el("span", { class: `state state-${m.state}`, text: m.state + dl })),
        el("td", { text: m.backend }),
        el("td", { text: m.gpus.length ? m.gpus.join(", ") : "CPU" }),
        el("td", { text: `${m.queued_requests} / ${m.active_requests}` }),
        el("td", { text: num(t.rps, 2) }),
        el("td", { text: t.p50 == null ? "–" : `${num(t.p50, 0)} ms` }),
        el("td", {}, el("button", { type: "button", text: "Open", onclick: (ev) => { ev.stopPropagation(); select(m.id); } })));
    }));
    if (selected) showDetail();
  }
  $("filter").addEventListener("input", render);
  $("sort").addEventListener("change", render);

  // ------------------------------------------------------------------ one model
  function select(id) {
    if (selected !== id) {
      selected = id;
      $("history-box").open = false; $("log-box").open = false; stopLog();
      $("diff").hidden = true;
      renderGpuChoice();
    }
    $("detail").hidden = false;
    showDetail();
    $("detail").scrollIntoView({ block: "nearest" });
  }
  $("detail-close").onclick = () => { selected = null; $("detail").hidden = true; stopLog(); };

  function renderGpuChoice() {
    const box = $("gpu-options");
    const card = models.get(selected);
    if (!gpus.length) { box.replaceChildren(el("span", { class: "hint", text: "no GPU: CPU only" })); return; }
    const pinned = new Set((card && card.gpu_override) || []);
    box.replaceChildren(...gpus.map((g) => el("label", {},
      el("input", { type: "checkbox", value: g.index, checked: pinned.has(g.index) }), `${g.index}`)));
  }

  function showDetail() {
    const m = models.get(selected);
    if (!m) { $("detail").hidden = true; return; }
    $("detail-title").textContent = m.id;
    let w = m.worker ? ` · worker pid ${m.worker.pid}, up ${seconds(m.worker.uptime_seconds)}` : "";
    const r = m.rollout;
    if (r && !["done", "rolled_back"].includes(r.state)) w += ` · update ${r.mode}: ${r.state}`;
    else if (r && r.state === "rolled_back") w += ` · last update rolled back: ${r.reason || ""}`;
    $("detail-state").replaceChildren(el("span", { class: `state state-${m.state}`, id: "detail-state-value", text: m.state }),
      ` ${m.backend} · ${m.task} · GPUs: ${m.gpus.length ? m.gpus.join(", ") : "CPU"}${w}`);
    $("detail-error").hidden = !m.last_error;
    $("detail-error").textContent = m.last_error || "";
    const s = m.state;
    $("act-load").disabled = !["cached", "failed", "absent"].includes(s);
    $("act-unload").disabled = !["ready", "starting"].includes(s);
    $("act-download").disabled = !(s === "absent" || s === "failed") || !(m.spec.source && m.spec.source.hf);
    $("act-cancel").disabled = s !== "downloading";
    $("act-delete").disabled = m.source !== "api";  // a models-file model is removed there
    $("act-delete").title = m.source === "api" ? "" : "declared in the models file: remove it there";
    $("act-delete-cache").disabled = !(m.spec.source && m.spec.source.hf) || ["ready", "starting", "downloading", "stopping"].includes(s);
    showDownload(m);
  }

  function showDownload(m) {
    const d = m && m.download;
    const box = $("download");
    if (!d || m.state !== "downloading" && d.state !== "running") { box.hidden = true; return; }
    box.hidden = false;
    const total = d.bytes_total || 0;
    $("download-bar").value = total ? d.bytes_done / total : 0;
    $("download-text").textContent = `${bytes(d.bytes_done)} of ${total ? bytes(total) : "?"}` +
      ` · ${bytes(d.rate)}/s · ${d.eta_seconds == null ? "–" : seconds(d.eta_seconds) + " left"}` +
      ` · ${d.files_done}/${d.files_total} files`;
  }

  async function act(label, method, path, body) {
    try {
      await admin(method, path, body);
      toast(`${label}: ${selected}`);
    } catch (e) { toast(`${label} failed: ${e.message}`, true); }
  }
  $("act-load").onclick = () => {
    const chosen = [...$("gpu-options").querySelectorAll("input:checked")].map((i) => Number(i.value));
    act("Load", "POST", `/models/${idPath(selected)}/load?wait=false`,
        chosen.length ? { gpu_device_ids: chosen } : undefined);
  };
  $("act-unload").onclick = () => act("Unload", "POST", `/models/${idPath(selected)}/unload?wait=false`);
  $("act-download").onclick = () => act("Download", "POST", `/models/${idPath(selected)}/download`);
  $("act-cancel").onclick = () => act("Cancel", "DELETE", `/models/${idPath(selected)}/download`);
  $("act-delete-cache").onclick = () => {
    if (confirm(`Delete the files of ${selected} from the cache?`))
      act("Delete from cache", "DELETE", `/models/${idPath(selected)}/cache`);
  };
  $("act-delete").onclick = () => {
    if (confirm(`Remove ${selected}? (Only models added through the API can be removed.)`))
      act("Remove", "DELETE", `/models/${idPath(selected)}`);
  };
  $("act-edit").onclick = () => openForm(models.get(selected));

  // ------------------------------------------------------------------ history and diff
  $("history-box").addEventListener("toggle", () => { if ($("history-box").open) loadHistory(); });
  async function loadHistory() {
    const body = $("history").tBodies[0];
    let rows;
    try { rows = (await admin("GET", `/models/${idPath(selected)}/history`)).data; }
    catch (e) { body.replaceChildren(el("tr", {}, el("td", { colspan: 6, text: e.message }))); return; }
    const newest = Math.max(...rows.map((r) => r.version));
    body.replaceChildren(...rows.slice().reverse().map((r, i, all) => {
      const previous = rows.filter((x) => x.version < r.version).pop();
      return el("tr", {},
        el("td", { text: `v${r.version}${r.version === newest ? " (current)" : ""}` }),
        el("td", { text: new Date(r.created_at).toLocaleString() }),
        el("td", { text: r.action }), el("td", { text: r.actor }), el("td", { text: r.reason || "" }),
        el("td", {},
          previous ? el("button", { type: "button", text: "Diff", onclick: () => showDiff(previous, r) }) : null,
          r.version !== newest && r.spec ? el("button", { type: "button", class: "rollback", text: "Roll back to this",
            onclick: () => { if (confirm(`Serve v${r.version}'s spec of ${selected} again?`))
              act("Rollback", "POST", `/models/${idPath(selected)}/rollback`, { version: r.version }).then(loadHistory); } }) : null));
    }));
  }
  const canonical = (v) => JSON.stringify(v, (k, x) => x && typeof x === "object" && !Array.isArray(x)
    ? Object.fromEntries(Object.entries(x).sort()) : x, 2).split("\n");
  function showDiff(a, b) {
    const x = canonical(a.spec || {}), y = canonical(b.spec || {});
    // Longest common subsequence of lines: small specs, quadratic is fine.
    const n = x.length, m = y.length, L = Array.from({ length: n + 1 }, () => new Int32Array(m + 1));
    for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--)
      L[i][j] = x[i] === y[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
    const out = [el("div", { text: `v${a.version} → v${b.version}` })];
    let i = 0, j = 0;
    while (i < n || j < m) {
      if (i < n && j < m && x[i] === y[j]) { out.push(el("div", { text: "  " + x[i] })); i++; j++; }
      else if (j < m && (i >= n || L[i][j + 1] >= L[i + 1][j])) { out.push(el("div", { class: "add", text: "+ " + y[j] })); j++; }
      else { out.push(el("div", { class: "del", text: "- " + x[i] })); i++; }
    }
    $("diff").replaceChildren(...out); $("diff").hidden = false;
  }

  // ------------------------------------------------------------------ worker log
  $("log-box").addEventListener("toggle", () => { if ($("log-box").open) startLog(); else stopLog(); });
  function startLog() {
    stopLog();
    $("log").textContent = "";
    logSource = new EventSource(`${prefix}/logs/${idPath(selected)}`);
    logSource.addEventListener("log", (ev) => {
      const pre = $("log");
      const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.textContent = (pre.textContent + JSON.parse(ev.data).text).slice(-64000);
      if (stick) pre.scrollTop = pre.scrollHeight;
    });
  }
  function stopLog() { if (logSource) { logSource.close(); logSource = null; } }

  // ------------------------------------------------------------------ add / edit form
  const form = $("spec");
  const FORM_FIELDS = ["id", "task", "backend", "aliases", "gpus", "max_concurrency", "max_queue"];
  $("add-model").onclick = () => openForm(null);
  $("spec-close").onclick = () => { $("spec-form").hidden = true; };
  function openForm(card) {
    clearErrors();
    const spec = card ? { ...card.spec } : { task: "chat", backend: "llamacpp" };
    $("spec-title").textContent = card ? `Edit ${card.id}` : "Add a model";
    form.id.value = spec.id || ""; form.id.readOnly = !!card;
    form.task.value = spec.task || "chat"; form.backend.value = spec.backend || "llamacpp";
    const src = spec.source || {};
    const kind = ["hf", "path", "package", "url"].find((k) => k in src) || "";
    form.source_kind.value = kind; form.source_value.value = kind ? src[kind] : "";
    form.aliases.value = (spec.aliases || []).join(", ");
    form.gpus.value = (spec.gpus || []).join(", ");
    form.max_concurrency.value = spec.max_concurrency ?? "";
    form.max_queue.value = spec.max_queue ?? "";
    const extra = { ...spec };
    for (const k of [...FORM_FIELDS, "source"]) delete extra[k];
    if (kind) { const rest = { ...src }; delete rest[kind]; if (Object.keys(rest).length) extra.source = rest; }
    form.extra.value = JSON.stringify(extra, null, 2);
    $("spec-form").hidden = false;
    $("spec-form").scrollIntoView({ block: "nearest" });
  }
  const list = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);
  const number = (text) => (text.trim() === "" ? undefined : /^-?\d+$/.test(text.trim()) ? Number(text) : text.trim());
  function buildSpec() {
    let extra;
    try { extra = JSON.parse(form.extra.value || "{}"); } catch (e) { return { error: ["extra", "not valid JSON: " + e.message] }; }
    if (typeof extra !== "object" || Array.isArray(extra) || extra === null) return { error: ["extra", "must be a JSON object"] };
    const spec = { ...extra, id: form.id.value.trim(), task: form.task.value, backend: form.backend.value };
    const kind = form.source_kind.value;
    if (kind) spec.source = { ...(extra.source || {}), [kind]: form.source_value.value.trim() };
    else delete spec.source;
    if (form.aliases.value.trim()) spec.aliases = list(form.aliases.value);
    if (form.gpus.value.trim()) spec.gpus = list(form.gpus.value).map(number);
    for (const k of ["max_concurrency", "max_queue"]) { const v = number(form[k].value); if (v !== undefined) spec[k] = v; }
    return { spec };
  }
  function clearErrors() {
    form.querySelectorAll(".field-error").forEach((n) => n.remove());
    form.querySelectorAll(".invalid").forEach((n) => n.classList.remove("invalid"));
    $("spec-general").hidden = true;
  }
  // A field path (source.hf, gpus.0, engine_args.x) -> the input that shows it.
  function inputFor(field) {
    const head = field.split(".")[0];
    if (head === "source") return field === "source" || field.startsWith("source.") && ["hf", "path", "package", "url"].includes(field.split(".")[1]) ? form.source_value : form.extra;
    if (FORM_FIELDS.includes(head)) return form[head];
    return head === "spec" ? null : form.extra;
  }
  function showErrors(errors) {
    clearErrors();
    const general = [];
    for (const { field, message } of errors) {
      const input = inputFor(field);
      if (!input) { general.push(message); continue; }
      input.classList.add("invalid");
      input.closest("label").append(el("span", { class: "field-error", "data-field": field, text: `${field}: ${message}` }));
    }
    if (general.length) { $("spec-general").textContent = general.join("\n"); $("spec-general").hidden = false; }
  }
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const built = buildSpec();
    if (built.error) { showErrors([{ field: built.error[0], message: built.error[1] }]); return; }
    const id = built.spec.id;
    if (!id) { showErrors([{ field: "id", message: "required" }]); return; }
    try {
      const check = await Dash.call("POST", `/check-spec/${idPath(id)}`, built.spec);
      if (!check.valid) { showErrors(check.errors); return; }
      await admin("PUT", `/models/${idPath(id)}`, built.spec);
      toast(`Saved ${id}`);
      $("spec-form").hidden = true;
    } catch (e) {
      const param = e.body && e.body.error && e.body.error.param;
      showErrors([{ field: param || "spec", message: e.message }]);
    }
  });
})();
