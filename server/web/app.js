// workmem's chat page. Speaks only the public JSON API:
//   GET  /v1/models                          model name, sampling defaults
//   GET  /v1/memory                          the KV pool picture (polled ~1/s while visible)
//   GET/POST/DELETE /v1/sessions[...]        list, create, rename (metadata.name), fork, delete
//   POST /v1/sessions/{id}/chat/completions  a turn, streamed as SSE; Stop aborts the fetch
"use strict";

const $ = (sel) => document.querySelector(sel);
const SAMPLING = ["temperature", "top_p", "top_k", "min_p", "max_tokens", "repetition_penalty"];
const MEMORY_POLL_MS = 1000;
const RENDER_MS = 50;    // a streaming answer is re-rendered at most this often
const GRID_CELLS = 256;  // the pool picture has at most this many cells; each stands for >= 1 block
const NAME_CHARS = 40;   // a new chat is named after the first characters of its first message
const store = window.localStorage;

const state = {
  sessions: [],          // GET /v1/sessions data, most recent last
  current: null,         // session id shown, or null for a chat not yet sent
  messages: [],          // the shown session's messages
  streaming: null,       // AbortController of the turn in flight
  defaults: {},          // the server's sampling defaults
  renaming: false,       // a session name is being edited: the sidebar is not redrawn
  stats: {},             // session id -> turn -> the numbers this page measured for that answer
};

// ---------------------------------------------------------------- HTTP
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("#api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

class ServerError extends Error {}

async function api(method, path, body) {
  const res = await fetch(path, { method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
  if (!res.ok) throw new ServerError(errorText(res.status, data, text));
  return data;
}

function errorText(status, data, text) {
  const message = data && data.error && data.error.message;
  return `${status}: ${message || text || "request failed"}`;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

// ---------------------------------------------------------------- sessions sidebar
function sessionName(s) {
  return (s.metadata && s.metadata.name) || s.id.slice(0, 14);
}

async function loadSessions() {
  const all = [];
  let after = null;
  for (;;) {  // every page
    const q = after ? `?limit=100&after=${encodeURIComponent(after)}` : "?limit=100";
    const page = await api("GET", "/v1/sessions" + q);
    all.push(...page.data);
    if (!page.has_more) break;
    after = page.last_id;
  }
  state.sessions = all;
  drawSessions();
}

function drawSessions() {
  if (state.renaming) return;  // redrawn when the rename ends
  const list = $("#session-list");
  list.replaceChildren();
  for (const s of [...state.sessions].reverse()) {
    const li = document.createElement("li");
    li.className = "session" + (s.id === state.current ? " active" : "");
    li.dataset.id = s.id;
    const open = document.createElement("button");
    open.className = "open";
    open.textContent = sessionName(s);
    open.title = `${s.id}\n${s.num_turns} turns, ${s.num_tokens} tokens, ${s.tier}`;
    open.onclick = () => openSession(s.id);
    const meta = document.createElement("span");
    meta.className = "small muted";
    meta.textContent = `${s.num_turns} turn${s.num_turns === 1 ? "" : "s"} · ${s.num_tokens} tokens · ${s.tier}`;
    const rename = button("✎", "rename", () => startRename(li, s));
    const del = button("✕", "delete", () => deleteSession(s.id));
    li.append(open, meta, rename, del);
    list.append(li);
  }
  $("#sessions-note").textContent = state.sessions.length ? "" : "No sessions yet: send a message to start one.";
}

function button(text, cls, onclick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = text;
  b.title = cls;
  b.onclick = onclick;
  return b;
}

function startRename(li, s) {
  const input = document.createElement("input");
  input.className = "rename-input";
  input.value = sessionName(s);
  li.replaceChildren(input);
  input.focus();
  input.select();
  state.renaming = true;
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    state.renaming = false;
    if (save && input.value.trim()) {
      try { await api("POST", `/v1/sessions/${s.id}`, { metadata: { name: input.value.trim() } }); }
      catch (e) { showError(e.message); }
    }
    await refreshSessions();
  };
  input.onkeydown = (e) => {
    if (e.key === "Enter") { e.preventDefault(); finish(true); }
    if (e.key === "Escape") finish(false);
  };
  input.onblur = () => finish(true);
}

async function refreshSessions() {
  try { await loadSessions(); showError(""); } catch (e) { showError(e.message); }
}

async function openSession(id) {
  if (state.streaming) return;
  try {
    const s = await api("GET", `/v1/sessions/${id}`);
    state.current = id;
    state.messages = s.messages;
    drawMessages();
    drawSessions();
    showError("");
    pollMemory();
    document.body.classList.remove("show-sessions");
  } catch (e) { showError(e.message); }
}

async function deleteSession(id) {
  try {
    await api("DELETE", `/v1/sessions/${id}`);
    if (state.current === id) newChat();
    await refreshSessions();
    pollMemory();
  } catch (e) { showError(e.message); }
}

async function forkAt(turn) {
  try {
    const src = state.sessions.find((s) => s.id === state.current);
    const child = await api("POST", `/v1/sessions/${state.current}/fork`, { num_turns: turn });
    const name = `${src ? sessionName(src) : "chat"} (fork @${turn})`;
    await api("POST", `/v1/sessions/${child.id}`, { metadata: { name } });
    await loadSessions();
    await openSession(child.id);
    pollMemory();
  } catch (e) { showError(e.message); }
}

function newChat() {
  state.current = null;
  state.messages = [];
  drawMessages();
  drawSessions();
  $("#prompt").focus();
}

// ---------------------------------------------------------------- messages
function drawMessages() {
  const box = $("#messages");
  box.replaceChildren();
  let turn = 0;
  for (const m of state.messages) {
    if (m.role === "assistant") turn++;
    const node = messageNode(m.role, m.content || "", m.role === "assistant" ? turn : null);
    const stats = m.stats || (state.stats[state.current] || {})[turn];  // measured in this page
    if (m.role === "assistant" && stats) node.querySelector(".stats").textContent = stats;
    box.append(node);
  }
  box.scrollTop = box.scrollHeight;
}

function messageNode(role, content, turn) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("div");
  body.className = "body";
  setContent(body, role, content);
  div.append(body);
  if (turn !== null) {
    const foot = document.createElement("div");
    foot.className = "foot small muted";
    const stats = document.createElement("span");
    stats.className = "stats";
    foot.append(stats);
    if (state.current) foot.append(button(`Fork at turn ${turn}`, "fork", () => forkAt(turn)));
    div.append(foot);
  }
  return div;
}

function setContent(body, role, content) {
  if (role === "assistant") body.innerHTML = window.renderMarkdown(content);
  else body.textContent = content;
}

function samplingFields() {
  const out = {};
  for (const name of SAMPLING) {
    const v = $("#" + name).value.trim();
    if (v !== "") out[name] = Number(v);
  }
  const extra = $("#extra").value.trim();
  if (extra) {
    let more;
    try { more = JSON.parse(extra); } catch (e) { throw new ServerError("More request fields: not JSON: " + e.message); }
    if (typeof more !== "object" || more === null || Array.isArray(more)) throw new ServerError("More request fields: give a JSON object");
    Object.assign(out, more);
  }
  return out;
}

async function ensureSession(firstMessage) {
  if (state.current) return state.current;
  const system = $("#system-prompt").value.trim();
  const body = { messages: system ? [{ role: "system", content: system }] : [],
                 metadata: { name: firstMessage.slice(0, NAME_CHARS) } };
  const s = await api("POST", "/v1/sessions", body);
  state.current = s.id;
  state.messages = s.messages;
  return s.id;
}

async function send(text) {
  showError("");
  let id;
  try { id = await ensureSession(text); } catch (e) { showError(e.message); return; }
  state.messages.push({ role: "user", content: text });
  drawMessages();
  refreshSessions();
  const turn = state.messages.filter((m) => m.role === "assistant").length + 1;
  const node = messageNode("assistant", "", turn);
  node.classList.add("streaming");
  $("#messages").append(node);
  const body = node.querySelector(".body");
  const stats = node.querySelector(".stats");
  const controller = new AbortController();
  setStreaming(controller);
  const started = performance.now();
  let text_ = "", firstAt = null, usage = null, finish = null, painting = null;
  const paint = (now) => {  // at most one markdown render per RENDER_MS: reading the stream never waits on it
    if (painting && !now) return;
    clearTimeout(painting);
    painting = setTimeout(() => {
      painting = null;
      setContent(body, "assistant", text_);
      $("#messages").scrollTop = $("#messages").scrollHeight;
    }, now ? 0 : RENDER_MS);
  };
  try {
    const res = await fetch(`/v1/sessions/${id}/chat/completions`, {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ messages: [{ role: "user", content: text }], stream: true,
                             stream_options: { include_usage: true }, ...samplingFields() }),
    });
    if (!res.ok) {
      const raw = await res.text();
      let data = null;
      try { data = JSON.parse(raw); } catch (_) { /* not JSON */ }
      throw new ServerError(errorText(res.status, data, raw));
    }
    for await (const event of sseEvents(res.body)) {
      if (event.error) throw new ServerError(errorText(event.error.code || "error", event, ""));
      if (event.usage) usage = event.usage;
      for (const c of event.choices || []) {
        const delta = (c.delta && c.delta.content) || "";
        if (delta) {
          if (firstAt === null) firstAt = performance.now();
          text_ += delta;
          paint();
        }
        if (c.finish_reason) finish = c.finish_reason;
      }
    }
    paint(true);
    stats.textContent = statsLine(usage, started, firstAt, performance.now(), finish);
    state.messages.push({ role: "assistant", content: text_, stats: stats.textContent });
    (state.stats[id] = state.stats[id] || {})[turn] = stats.textContent;
  } catch (e) {
    if (e.name === "AbortError") {
      paint(true);
      stats.textContent = "stopped: the server aborted the turn (the session is as before it)";
      state.messages.pop();  // the turn did not happen
      node.classList.add("stopped");
    } else {
      showError(e.message);
      state.messages.pop();  // the user's message goes back to the box
      drawMessages();
      if (!$("#prompt").value) $("#prompt").value = text;
    }
  } finally {
    node.classList.remove("streaming");
    setStreaming(null);
    refreshSessions();
    pollMemory();
  }
}

function statsLine(usage, started, firstAt, ended, finish) {
  const parts = [];
  const n = usage ? usage.completion_tokens : null;
  if (n !== null) parts.push(`${n} tokens`);
  if (firstAt !== null) parts.push(`TTFT ${((firstAt - started) / 1000).toFixed(2)} s`);
  if (n && firstAt !== null && ended > firstAt && n > 1) parts.push(`${((n - 1) / ((ended - firstAt) / 1000)).toFixed(1)} tok/s`);
  if (usage) {
    const cached = (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) || 0;
    parts.push(`prompt ${usage.prompt_tokens} (${cached} from memory)`);
  }
  if (finish) parts.push(`finish: ${finish}`);
  return parts.join(" · ");
}

async function* sseEvents(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function setStreaming(controller) {
  state.streaming = controller;
  $("#send").hidden = !!controller;
  $("#stop").hidden = !controller;
  $("#prompt").disabled = !!controller;
  if (!controller) $("#prompt").focus();
}

// ---------------------------------------------------------------- memory panel
const COLORS = { running: "#e8833a", shared: "#8e5bd0", cached: "#9fb7c9", free: "#eef1f4", other: "#c9a86b" };
const SESSION_HUES = [200, 140, 330, 40, 260, 100, 0, 170];

let memoryTimer = null;

async function pollMemory() {
  clearTimeout(memoryTimer);
  const shown = document.visibilityState === "visible" && $("#memory").offsetParent !== null;  // folded: not drawn
  if (shown) {
    try { drawMemory(await api("GET", "/v1/memory")); $("#memory").classList.remove("stale"); }
    catch (e) { $("#memory").classList.add("stale"); }
  }
  memoryTimer = setTimeout(pollMemory, MEMORY_POLL_MS);
}

function drawMemory(m) {
  const b = m.blocks;
  const parts = [["running", b.running, COLORS.running, "running requests"]];
  m.sessions.forEach((s, i) => {
    if (s.num_own_blocks) parts.push([`session ${s.id}`, s.num_own_blocks, sessionColor(i, s.id === state.current), s.name || s.id]);
  });
  if (m.other_sessions.num_own_blocks) parts.push(["other", m.other_sessions.num_own_blocks, COLORS.other, "other keys' sessions"]);
  parts.push(["shared", b.shared, COLORS.shared, "shared by forks"], ["cached", b.cached, COLORS.cached, "cached (evictable)"],
             ["free", b.free, COLORS.free, "free"]);
  drawGrid(parts, b.total);
  const legend = $("#memory-legend");
  legend.replaceChildren();
  for (const [key, n, color, label] of [
    ["pinned", b.pinned, sessionColor(0, false), "pinned by sessions"], ...parts.filter((p) => !p[0].startsWith("session "))]) {
    const li = document.createElement("li");
    const swatch = document.createElement("i");
    swatch.style.background = color;
    li.append(swatch);
    const count = document.createElement("b");
    count.id = "blocks-" + key;
    count.textContent = n;
    li.append(count, ` ${label}`);
    legend.append(li);
  }
  const total = document.createElement("li");
  total.textContent = `${b.total} blocks of ${m.block_size} tokens`;
  legend.append(total);
  $("#mem-running").textContent = m.requests.running;
  $("#mem-waiting").textContent = m.requests.waiting;
  const rows = $("#memory-sessions tbody");
  rows.replaceChildren();
  m.sessions.forEach((s, i) => {
    const tr = document.createElement("tr");
    tr.dataset.id = s.id;
    if (s.id === state.current) tr.className = "active";
    for (const v of [s.name || s.id.slice(0, 14), s.tier + (s.busy ? " (busy)" : ""),
                     `${s.num_resident_tokens}/${s.num_tokens}`, `${s.num_kv_blocks}`]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.append(td);
    }
    tr.firstChild.style.borderLeft = `6px solid ${sessionColor(i, false)}`;
    rows.append(tr);
  });
}

function sessionColor(i, active) {
  return `hsl(${SESSION_HUES[i % SESSION_HUES.length]} 60% ${active ? 38 : 55}%)`;
}

function drawGrid(parts, total) {
  const grid = $("#memory-grid");
  const cells = Math.min(total, GRID_CELLS);
  const per = total / cells;  // blocks per cell
  grid.replaceChildren();
  let acc = 0, k = 0;
  const bounds = parts.map(([, n]) => (acc += n));  // cumulative block counts
  for (let c = 0; c < cells; c++) {
    const mid = (c + 0.5) * per;  // the block this cell stands for
    while (k < bounds.length - 1 && mid >= bounds[k]) k++;
    const cell = document.createElement("i");
    cell.style.background = parts[k][2];
    cell.title = parts[k][3];
    grid.append(cell);
  }
}

// ---------------------------------------------------------------- settings and start
function bindSettings() {
  const key = $("#api-key");
  key.value = store.getItem("workmem.apiKey") || "";
  key.onchange = () => { store.setItem("workmem.apiKey", key.value.trim()); refreshSessions(); pollMemory(); };
  const sys = $("#system-prompt");
  sys.value = store.getItem("workmem.system") || "";
  sys.onchange = () => store.setItem("workmem.system", sys.value);
  for (const name of [...SAMPLING, "extra"]) {
    const input = $("#" + name);
    input.value = store.getItem("workmem." + name) || "";
    input.onchange = () => store.setItem("workmem." + name, input.value.trim());
  }
}

async function loadModel() {
  try {
    const models = await api("GET", "/v1/models");
    const m = models.data[0];
    $("#model-name").textContent = m.id;
    state.defaults = m.sampling_defaults || {};
    for (const name of SAMPLING) {
      if (state.defaults[name] !== undefined) $("#" + name).placeholder = String(state.defaults[name]);
    }
  } catch (e) { showError(e.message); }
}

function start() {
  bindSettings();
  $("#composer").onsubmit = (e) => {
    e.preventDefault();
    const text = $("#prompt").value;
    if (!text.trim() || state.streaming) return;
    $("#prompt").value = "";
    send(text);
  };
  $("#prompt").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("#composer").requestSubmit();
    }
  };
  $("#stop").onclick = () => state.streaming && state.streaming.abort();
  $("#new-session").onclick = () => { if (!state.streaming) newChat(); };
  $("#toggle-sessions").onclick = () => document.body.classList.toggle("show-sessions");
  $("#toggle-memory").onclick = () => { document.body.classList.toggle("show-side"); pollMemory(); };
  $("#messages").onclick = (e) => {
    const copy = e.target.closest("button.copy");
    if (copy) copyCode(copy);
  };
  document.addEventListener("visibilitychange", pollMemory);
  loadModel();
  refreshSessions();
  pollMemory();
  newChat();
}

async function copyCode(btn) {
  const code = btn.parentElement.querySelector("code").textContent;
  try { await navigator.clipboard.writeText(code); }
  catch (_) {  // no clipboard API (a plain-http origin): the selection way
    const t = document.createElement("textarea");
    t.value = code;
    document.body.append(t);
    t.select();
    document.execCommand("copy");
    t.remove();
  }
  btn.textContent = "Copied";
  setTimeout(() => { btn.textContent = "Copy"; }, 1200);
}

start();
