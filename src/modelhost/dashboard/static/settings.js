// Keys & settings: the Hugging Face token, usage by key, the audit log.
"use strict";
(() => {
  const { admin, el, toast, num } = Dash;
  const $ = (id) => document.getElementById(id);

  async function token() {
    try {
      const t = await admin("GET", "/token");
      $("token-state").textContent = t.set
        ? `A token is set (${t.source}): ${t.masked}.`
        : "No token is set: gated or private models cannot be downloaded.";
      $("token-state").dataset.state = JSON.stringify(t);
    } catch (e) { $("token-state").textContent = e.message; }
  }
  $("token-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    try { await admin("PUT", "/token", { token: value }); $("token").value = ""; toast("Token stored"); }
    catch (e) { toast(e.message, true); }
    token();
  });
  $("token-delete").onclick = async () => {
    if (!confirm("Delete the stored Hugging Face token?")) return;
    try { await admin("DELETE", "/token"); toast("Token deleted"); } catch (e) { toast(e.message, true); }
    token();
  };

  async function usage() {
    const since = new Date(Date.now() - 7 * 24 * 3600e3).toISOString();
    try {
      const r = await admin("GET", `/usage?group_by=key&since=${encodeURIComponent(since)}`);
      $("key-usage").tBodies[0].replaceChildren(...r.data.map((u) => el("tr", {},
        ...[u.key_id, u.requests, u.prompt_tokens, u.completion_tokens, num(u.audio_seconds, 1), u.embedding_inputs]
          .map((v) => el("td", { text: String(v) })))));
      const a = await admin("GET", "/audit?limit=20");
      $("audit").tBodies[0].replaceChildren(...a.data.map((x) => el("tr", {},
        ...[new Date(x.at).toLocaleString(), x.actor, x.action, x.model || "", x.status ?? ""]
          .map((v) => el("td", { text: String(v) })))));
    } catch (e) { toast(e.message, true); }
  }
  token(); usage();
  // Live: the audit log and usage again after each admin action the stream reports, at most
  // every few seconds, and once a minute anyway.
  let due = null;
  const soon = () => { if (!due) due = setTimeout(() => { due = null; usage(); }, 3000); };
  Dash.on("state", soon); Dash.on("rollout", soon);
  setInterval(usage, 60000);
})();
