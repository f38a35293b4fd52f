// The chat page: a plain client of the public API (/api/...), with no framework.
// Text from people and from the model is only ever inserted with textContent,
// never as HTML. Streams are read with fetch (EventSource cannot send the key).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  key: localStorage.getItem("chatbot.key") || "",
  sessionId: null,   // the open session (null: a new chat, created on its first message)
  live: null,        // the reply shown as it grows: {sessionId, messageId, position, text, el}
  controller: null,  // aborts the request that feeds `live`
};

// --- talking to the API -------------------------------------------------------

class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || `The server answered with status ${status}.`);
    this.status = status;
    this.code = problem.code;
  }
}

// fetch with the key; an error answer (problem+json) becomes an ApiError whose
// message is the problem's human sentence.
async function api(method, path, body, signal) {
  const headers = {};
  if (state.key) headers.Authorization = "Bearer " + state.key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {method, headers, signal,
                                  body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, {detail: "The server cannot be reached. Is it running?"});
  }
  if (response.ok) return response;
  let problem = {};
  try { problem = await response.json(); } catch { /* not JSON: the generic sentence */ }
  const error = new ApiError(response.status, problem);
  const wait = response.headers.get("Retry-After");
  if (wait) error.message += ` Try again in ${wait} s.`;
  if (response.status === 401) askForKey(state.key ? "This key was not accepted: " + error.message : "");
  throw error;
}

// The JSON of an answer (null for 204 No Content).
async function call(method, path, body) {
  const response = await api(method, path, body);
  return response.status === 204 ? null : response.json();
}

// Read a text/event-stream body, calling onEvent(name, data, id) for each event.
// Comments (keep-alives), `data: [DONE]` and data that is not JSON are skipped;
// the caller ignores event names it does not know.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();  // {stream: true} keeps a character split across reads whole
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    // Lines may end in \r\n or \r; a \r last in the buffer waits to see if \n follows.
    buffer = (buffer + decoder.decode(value, {stream: true})).replace(/\r\n|\r(?!$)/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message", id = null;
      const data = [];
      for (const line of block.split("\n")) {
        const colon = line.indexOf(":");
        if (colon === 0) continue;
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = text;
        else if (field === "data") data.push(text);
        else if (field === "id") id = text;
      }
      if (data.length === 0 || data.join("\n") === "[DONE]") continue;
      let parsed;
      try { parsed = JSON.parse(data.join("\n")); } catch { continue; }
      onEvent(name, parsed, id);
    }
  }
}

// --- showing messages --------------------------------------------------------

// A new element with a class and its text (always as text, never as HTML).
function make(tag, className, text = "") {
  const el = document.createElement(tag);
  el.className = className;
  el.textContent = text;
  return el;
}

function addMessage(role, text, messageId) {
  const el = make("div", "message " + role);
  if (messageId) el.dataset.messageId = messageId;
  el.append(make("div", "body"), make("div", "note"));
  $("messages").append(el);
  setText(el, text);
  return el;
}

// Fenced code blocks (```) go in a <pre>; the rest keeps its line breaks (CSS pre-wrap).
function setText(el, text) {
  const stick = nearBottom();
  const parts = text.split(/^```[^\n]*\n?/m);
  el.querySelector(".body").replaceChildren(
    ...parts.flatMap((part, i) => (part ? [make(i % 2 ? "pre" : "p", "", part)] : [])));
  if (stick) scrollDown();
}

function setNote(el, text, kind) {
  const note = el.querySelector(".note");
  note.textContent = text;
  note.className = "note " + (kind || "");
}

// Why a reply is not a plain complete answer, in words.
function noteFor(m) {
  if (m.status === "failed") return (m.error && m.error.detail) || "The reply failed.";
  if (m.finish_reason === "stopped") return "Stopped.";
  if (m.status === "incomplete") return "Cut short" + (m.error ? ": " + m.error.detail : ".");
  if (m.finish_reason === "length") return "Stopped at the length limit.";
  return "";
}

// Keep the newest text in view, unless the person scrolled up to read.
const nearBottom = (m = $("messages")) => m.scrollHeight - m.scrollTop - m.clientHeight < 40;
const scrollDown = (m = $("messages")) => { m.scrollTop = m.scrollHeight; };

function notice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

function showError(e) {
  if (e.name !== "AbortError" && e.status !== 401) notice(e.message);  // 401: the key dialog says it
}

function updateButtons() {
  const last = $("messages").lastElementChild;
  $("send").hidden = !!state.live;
  $("stop").hidden = !state.live;
  $("regenerate").hidden = !!state.live || !last || !last.classList.contains("assistant");
  $("rename").hidden = $("delete").hidden = !state.sessionId;
}

// --- sessions ----------------------------------------------------------------

async function loadSessions() {
  const {sessions} = await call("GET", "/api/sessions?limit=100");
  $("sessions").replaceChildren(...sessions.map((s) => {
    const button = make("button", s.session_id === state.sessionId ? "active" : "", s.title || "Untitled");
    button.dataset.sessionId = s.session_id;
    button.addEventListener("click", () => { notice(""); openSession(s.session_id).catch(showError); });
    if (s.session_id === state.sessionId) $("title").textContent = button.textContent;
    const item = make("li", "");
    item.append(button);
    return item;
  }));
}

async function openSession(id) {
  detach();
  state.sessionId = id;
  sessionStorage.setItem("chatbot.open", id);
  const [session, {messages}] = await Promise.all([
    call("GET", `/api/sessions/${id}`), call("GET", `/api/sessions/${id}/messages`)]);
  if (state.sessionId !== id) return;  // another session was opened meanwhile
  $("title").textContent = session.title || "Untitled";
  for (const b of $("sessions").querySelectorAll("button")) b.classList.toggle("active", b.dataset.sessionId === id);
  $("messages").replaceChildren();
  const running = remembered(id);
  for (const m of messages) {
    if (running && m.message_id === running.messageId) continue;  // shown live below
    setNote(addMessage(m.role, m.content, m.message_id), noteFor(m), m.status === "failed" ? "error" : "");
  }
  scrollDown();
  updateButtons();
  if (running) await attach(running);
}

function newChat() {
  detach();
  state.sessionId = null;
  sessionStorage.removeItem("chatbot.open");
  $("title").textContent = "New chat";
  $("messages").replaceChildren();
  for (const b of $("sessions").querySelectorAll("button")) b.classList.remove("active");
  updateButtons();
  $("input").focus();
}

// --- a turn, and the reply as it grows ------------------------------------------

// The running reply of a session, kept in sessionStorage so that a reloaded
// page shows the text it had and asks only for what came after.
const runningKey = (sessionId) => "chatbot.running." + sessionId;
const remembered = (sessionId) => JSON.parse(sessionStorage.getItem(runningKey(sessionId)) || "null");
const forget = (live) => sessionStorage.removeItem(runningKey(live.sessionId));
function remember({sessionId, messageId, position, text}) {
  sessionStorage.setItem(runningKey(sessionId), JSON.stringify({sessionId, messageId, position, text}));
}

// Stop showing a reply live (another session is opened); the reply itself goes on.
function detach() {
  if (state.controller) state.controller.abort();
  state.live = state.controller = null;
}

async function turn(body) {
  try {
    if (!state.sessionId) {
      state.sessionId = (await call("POST", "/api/sessions")).session_id;
      sessionStorage.setItem("chatbot.open", state.sessionId);
    }
    // "continue": a reload, another session opened or a closed tab does not stop the reply (Stop does).
    const controller = new AbortController(), request = {session_id: state.sessionId, on_disconnect: "continue"};
    const response = await api("POST", "/api/chat/stream", {...request, ...body}, controller.signal);
    await follow(response, {sessionId: state.sessionId, messageId: null, position: 0, text: ""}, controller);
  } catch (e) {
    if (e.name === "AbortError") return;
    showError(e);
    // Show what the server kept: the message stays stored when the LLM failed
    // (upstream_*), else it was refused and goes back into the box to send again.
    if (state.sessionId) await openSession(state.sessionId).catch(() => {});
    if (!$("input").value && body.message && !String(e.code).startsWith("upstream_")) $("input").value = body.message;
  }
}

// Re-attach to a reply that is running or ended, from the position already shown.
async function attach(live, tries = 0) {
  const controller = new AbortController();
  try {
    const response = await api("GET", `/api/sessions/${live.sessionId}/messages/${live.messageId}` +
                               `/stream?after=${live.position}`, undefined, controller.signal);
    await follow(response, live, controller, tries);
  } catch (e) {
    if (e.name === "AbortError") return;
    forget(live);
    showError(e);
  }
}

async function follow(response, live, controller, tries = 0) {
  state.live = live;
  state.controller = controller;
  live.el = addMessage("assistant", live.text, live.messageId);
  live.el.classList.add("live");  // a blinking caret while text may still come
  updateButtons();
  let ended = false;
  try {
    await readEvents(response, (name, data, id) => {
      if (name === "start") {
        live.messageId = live.el.dataset.messageId = data.message_id;
        remember(live);
        loadSessions().catch(showError);  // a new session's title, and the order
      } else if (name === "delta") {
        live.text += data.content;
        live.position = id !== null ? Number(id) : live.position + [...data.content].length;
        setText(live.el, live.text);
        remember(live);
      } else if (name === "done" || name === "error") {
        ended = true;
        const failed = name === "error" || data.status === "failed";
        setNote(live.el, name === "error" ? data.detail : noteFor(data), failed ? "error" : "");
      }
    });
  } catch (e) {
    if (e.name === "AbortError" || state.live !== live) return;  // detached on purpose
  } finally {
    if (state.live === live) state.live = state.controller = null;
    live.el.classList.remove("live");
    updateButtons();
  }
  if (ended) return forget(live);
  if (state.sessionId !== live.sessionId) return;
  if (tries >= 3) return setNote(live.el, "The connection was lost; reload the page to see the rest.", "error");
  // The connection broke: pick the reply up again where it was.
  live.el.remove();
  await new Promise((resolve) => setTimeout(resolve, 1000));
  if (state.sessionId === live.sessionId && !state.live) await attach(live, tries + 1);
}

// --- the API key ---------------------------------------------------------------

function askForKey(error) {
  $("key-dialog").hidden = false;
  $("key-error").textContent = error;
  $("key-error").hidden = !error;
  $("key-input").focus();
}

async function start() {
  try {
    await loadSessions();
  } catch (e) {
    showError(e);
    return;
  }
  const open = sessionStorage.getItem("chatbot.open");
  // The session open before a reload (gone meanwhile: a new chat, without a word).
  if (open && !state.sessionId) await openSession(open).catch((e) => { newChat(); if (e.status !== 404) showError(e); });
}

// --- wiring --------------------------------------------------------------------

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("key-input").value.trim();
  localStorage.setItem("chatbot.key", state.key);
  $("key-dialog").hidden = true;
  $("key-input").value = "";
  start();
});

$("forget-key").addEventListener("click", () => askForKey(""));

$("input").addEventListener("keydown", (event) => {
  // isComposing: Enter that ends a Korean (IME) composition must not send.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value;
  if (!text.trim() || state.live) return;
  $("input").value = "";
  notice("");
  addMessage("user", text);
  scrollDown();
  turn({message: text});
});

$("stop").addEventListener("click", () => {
  if (!state.live) return;
  call("POST", `/api/sessions/${state.live.sessionId}/stop`).catch((e) => {
    if (e.code !== "nothing_to_stop") showError(e);  // it had just ended
  });
});

$("regenerate").addEventListener("click", () => {
  notice("");
  $("messages").lastElementChild.remove();
  turn({regenerate: true});
});

$("new-session").addEventListener("click", () => { notice(""); newChat(); });

$("rename").addEventListener("click", async () => {
  const title = (prompt("A new title for this conversation:", $("title").textContent) || "").trim();
  if (!title) return;
  try {
    $("title").textContent = (await call("PATCH", `/api/sessions/${state.sessionId}`, {title})).title;
    await loadSessions();
  } catch (e) { showError(e); }
});

$("delete").addEventListener("click", async () => {
  if (!confirm(`Delete "${$("title").textContent}" and all its messages?`)) return;
  try {
    await call("DELETE", `/api/sessions/${state.sessionId}`);
    forget({sessionId: state.sessionId});
    newChat();
    await loadSessions();
  } catch (e) { showError(e); }
});

start();
