// Playground: streamed chat, speech to text (with speakers), embeddings similarity. Every call
// goes to /v1 through the session bridge (the page holds no key).
"use strict";
(() => {
  const { v1, call, el, toast, num } = Dash;
  const $ = (id) => document.getElementById(id);
  const history = [];

  on();
  async function on() {
    let models = [];
    try { models = (await v1("GET", "/models")).data; } catch (e) { toast(e.message, true); }
    const fill = (select, task, prefer) => {
      const list = models.filter((m) => (m.task || m.modelhost && m.modelhost.task) === task ||
        (task === "chat" && !m.task && !(m.modelhost && m.modelhost.task)));
      select.replaceChildren(...list.map((m) => el("option", { value: m.id, text: m.id, selected: m.id === prefer })));
    };
    const task = (m) => m.task || (m.modelhost && m.modelhost.task) || "";
    fill($("chat-model"), "chat", "smollm2-135m");
    fill($("audio-model"), "transcription", "whisper-tiny.en");
    fill($("diarize-model"), "diarization", "resemblyzer");
    fill($("embed-model"), "embedding", "all-minilm-l6-v2");
  }

  // ------------------------------------------------------------------ chat, streamed
  $("chat-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = $("chat-input").value.trim();
    if (!text) return;
    $("chat-input").value = "";
    history.push({ role: "user", content: text });
    $("chat-log").append(el("div", { class: "msg user", text }));
    const answer = el("div", { class: "msg assistant" });
    $("chat-log").append(answer);
    $("chat-send").disabled = true;
    try {
      const resp = await call("POST", "/v1/chat/completions", { model: $("chat-model").value,
        messages: history, stream: true, max_tokens: 128 }, { raw: true });
      if (!resp.ok) { const e = await resp.json(); throw new Error(e.error ? e.error.message : resp.statusText); }
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "", full = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
            if (delta && delta.content) { full += delta.content; answer.textContent = full; }
          }
        }
        $("chat-log").scrollTop = $("chat-log").scrollHeight;
      }
      history.push({ role: "assistant", content: full });
      answer.dataset.done = "1";
    } catch (e) { answer.textContent = "⚠ " + e.message; answer.classList.add("error"); }
    $("chat-send").disabled = false;
  });

  // ------------------------------------------------------------------ speech to text
  const fmt = (s) => `${Math.floor(s / 60)}:${(s % 60).toFixed(1).padStart(4, "0")}`;
  $("audio-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const file = $("audio-file").files[0];
    if (!file) return;
    const form = new FormData();
    form.append("file", file);
    form.append("model", $("audio-model").value);
    const diarize = $("audio-diarize").checked;
    if (diarize) {
      // OpenAI's diarization format: segments with speaker, start, end and text.
      form.append("response_format", "diarized_json");
      if ($("diarize-model").value) form.append("diarization_model", $("diarize-model").value);
    } else form.append("response_format", "verbose_json");
    $("audio-status").textContent = "Transcribing… (a model that is not loaded is loaded first)";
    $("audio-send").disabled = true;
    $("transcript").replaceChildren();
    try {
      const started = performance.now();
      const body = await call("POST", "/v1/audio/transcriptions", form);
      const speakers = [...new Set((body.segments || []).map((s) => s.speaker).filter((s) => s !== undefined))];
      $("audio-status").textContent = `${num(body.duration, 1)} s of audio in ${num((performance.now() - started) / 1000, 1)} s` +
        (diarize ? ` · ${speakers.length} speaker${speakers.length === 1 ? "" : "s"}` : "");
      $("transcript").replaceChildren(...(body.segments || [{ start: 0, end: body.duration, text: body.text }]).map((s) => {
        const who = s.speaker === undefined ? null : String(s.speaker);
        const n = who === null ? -1 : speakers.indexOf(s.speaker);
        return el("div", { class: `seg${n >= 0 ? " spk-" + (n % 5) : ""}`, "data-speaker": who },
          el("div", {}, el("span", { class: "spk", text: who === null ? "" : `Speaker ${who}` }),
            el("span", { class: "when", text: `${fmt(s.start || 0)} – ${fmt(s.end || 0)}` })),
          el("div", { class: "text", text: (s.text || "").trim() }));
      }));
    } catch (e) { $("audio-status").textContent = "⚠ " + e.message; }
    $("audio-send").disabled = false;
  });

  // ------------------------------------------------------------------ embeddings
  $("embed-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const lines = $("embed-input").value.split("\n").map((s) => s.trim()).filter(Boolean).slice(0, 12);
    if (lines.length < 2) { $("embed-status").textContent = "Give two sentences or more, one a line."; return; }
    $("embed-status").textContent = "Embedding…";
    try {
      const body = await v1("POST", "/embeddings", { model: $("embed-model").value, input: lines });
      const vecs = body.data.sort((a, b) => a.index - b.index).map((d) => d.embedding);
      const cos = (a, b) => { let d = 0, x = 0, y = 0; for (let i = 0; i < a.length; i++) { d += a[i] * b[i]; x += a[i] * a[i]; y += b[i] * b[i]; } return d / Math.sqrt(x * y); };
      const head = el("tr", {}, el("th"), ...lines.map((_, i) => el("th", { text: `#${i + 1}` })));
      const rows = lines.map((line, i) => el("tr", {}, el("th", { text: `#${i + 1} ${line.slice(0, 40)}` }),
        ...vecs.map((v, j) => { const c = cos(vecs[i], v);
          const cell = el("td", { class: "sim-cell", text: c.toFixed(2) });
          cell.style.background = `rgba(37, 99, 235, ${Math.max(0, c).toFixed(2) * 0.5})`;
          return cell; })));
      $("similarity").replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
      $("embed-status").textContent = `${vecs.length} vectors of ${vecs[0].length} dimensions (cosine similarity)`;
    } catch (e) { $("embed-status").textContent = "⚠ " + e.message; }
  });
})();
