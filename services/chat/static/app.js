// The settings/chat page: plain JS, no build step. Identity and the user's keys live in HttpOnly
// cookies this script cannot read; it only ever sees each key's hint. What the page says a feature
// will do comes from the server's own routing rule (settings.features), never from a guess here.
"use strict";

const $ = (id) => document.getElementById(id);
// Each provider's name as shown, from the server (/api/config `provider_names`, read from the provider
// modules): NAMES[p] is that name, or p itself before the config has arrived.
const NAMES = new Proxy({}, { get: (_, p) => ((state.config && state.config.provider_names) || {})[p] || p });
const FEATURES = { chat: "Chat", deep_analysis: "Deep analysis", code_fix: "Code fix", code_canvas: "Code canvas" };
const LOW_SHARE = 0.1; // warn below 10% of the last grant
// keyNotes: the last check answer per provider, so one provider's wait is never shown for another.
// balance: what a new call can use (the balance less the credits held by calls still running).
const state = { saving: Promise.resolve(), pendingSaves: 0, config: null, settings: null, balance: null, held: 0, lastGrant: null, keyNotes: {}, sending: false,
                retry: null, signedIn: false };
const MAX_MESSAGE = 20000;

async function api(path, options = {}) {
  const init = { credentials: "same-origin", headers: {}, ...options };
  if (options.json !== undefined) {
    init.method = init.method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.json);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (_) {
    // Offline or the server away: an answer like any other, never an uncaught "Failed to fetch".
    return { ok: false, status: 0, body: { message: "The server cannot be reached right now. Try again in a minute." } };
  }
  let body = {};
  try { body = await response.json(); } catch (_) { /* empty body */ }
  if (response.status === 401 && state.signedIn && !path.startsWith("/auth/")) signedOut();
  return { ok: response.ok, status: response.status, body };
}

// The session ended elsewhere (Sign out in another tab, "sign out everywhere", or it expired).
function signedOut() {
  if (!state.signedIn) return;
  showSignIn("You were signed out (in another tab, on another device, or the session ended). Sign in again.");
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
const credits = (n) => plural(n, "credit");

// Text with its http(s) URLs as links; everything goes in as text nodes, never as HTML.
const URL_RE = /https?:\/\/[^\s<>"')]+[^\s<>"').,;:!?]/g;
function setText(el, text) {
  el.replaceChildren();
  text = text || "";
  let last = 0;
  for (const m of text.matchAll(URL_RE)) {
    el.append(text.slice(last, m.index));
    const a = document.createElement("a");
    a.href = m[0];
    a.textContent = m[0];
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    el.append(a);
    last = m.index + m[0].length;
  }
  el.append(text.slice(last));
}

function setStatus(kind, text) {
  const el = $("key-status");
  el.className = "status" + (kind ? " " + kind : "");
  setText(el, text);
}

function timeOf(iso) {
  const d = new Date(iso);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

// --- what each feature will do -------------------------------------------------------------------

function featureLine(feature) {
  const s = state.settings;
  if (!s) return ["", ""];
  const f = s.features[feature];
  const have = state.balance === null ? "" : ` You have ${credits(state.balance)}.`;
  const name = FEATURES[feature];
  // The reason and what to do are said once, beside the key; here only what it means for this feature.
  if (f.runs_on === "paused") {
    return ["error", `${name} is paused until a working ${NAMES[f.provider]} key is added (see Model settings) ` +
                     "or “use my own API key” is switched off. Nothing is charged."];
  }
  if (f.runs_on === "your_key") return ["valid", `${name} runs on your ${NAMES[f.provider]} key: no credits.`];
  if (f.credits === null) return ["error", `${name}: ${f.message}`];
  const short = state.balance !== null && state.balance < f.credits ? " Not enough for this call." : "";
  if (f.fallback) {
    return ["notice", `${name} falls back to platform credits (no usable ${NAMES[f.provider]} key): ` +
                      `${credits(f.credits)} per message.${have}${short}`];
  }
  const where = feature === "chat" ? `${f.model} on platform credits` : `the platform's ${f.model}, always on credits`;
  const per = feature === "chat" ? "message" : "call";
  return [short ? "error" : "platform", `${name} runs on ${where}: ${credits(f.credits)} per ${per}.${have}${short}`];
}

function renderFeatureStatus() {
  const [kind, text] = featureLine($("feature").value);
  const el = $("feature-status");
  el.className = "status line " + kind;
  setText(el, text);
}

function renderBadge() {
  const badge = $("badge");
  const s = state.settings;
  if (!s) { badge.hidden = true; return; }
  badge.hidden = false;
  const held = state.held ? ` (${state.held} held by running calls)` : "";
  const left = state.balance === null ? "credits unknown" : `${credits(state.balance)} left${held}`;
  const chat = s.features.chat;
  if (chat.runs_on === "your_key") {
    badge.className = "badge byok";
    badge.textContent = `Chat: your key · ${left}`;
  } else if (chat.runs_on === "paused") {
    badge.className = "badge attention";
    badge.textContent = `Chat paused: no usable key · ${left}`;
  } else {
    badge.className = chat.fallback ? "badge attention" : "badge platform";
    badge.textContent = `${chat.fallback ? "Chat: platform credits (fallback)" : "Platform credits"} · ${left}`;
  }
}

function renderLowBalance() {
  const el = $("low-balance");
  const grant = state.lastGrant;
  if (state.balance === null || !grant || state.balance >= grant.credits * LOW_SHARE) { el.hidden = true; return; }
  el.hidden = false;
  setText(el, `Low balance: ${credits(state.balance)} left of the ${grant.credits} in your last grant ` +
              `(${grant.plan} plan). Deep analysis, code fix, code canvas and platform chat stop when it runs out. ` +
              "To get more, ask your workspace admin for a grant or a bigger plan; chat on your own API key " +
              "uses no credits.");
}

function renderAll() {
  renderBadge();
  renderFeatureStatus();
  renderLowBalance();
}

// --- settings and keys ---------------------------------------------------------------------------

function fillModels(provider, selected) {
  const select = $("model");
  select.replaceChildren();
  const models = [...(state.config.models[provider] || [])];
  if (selected && !models.some((m) => m.id === selected)) models.push({ id: selected, credits: null });
  for (const m of models) {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.credits === null ? `${m.id} (your key only)` : `${m.id} (${credits(m.credits)})`;
    select.append(option);
  }
  if (selected) select.value = selected;
  describeModel();
}

function describeModel() {
  const m = (state.config.models[$("provider").value] || []).find((x) => x.id === $("model").value);
  $("model-price").textContent = !m || m.credits === null
    ? "No platform price: this model runs only on your own key."
    : `On platform credits, a chat message costs ${credits(m.credits)}.`;
}

function lifetimeText() {
  const hours = Math.round(state.config.key_lifetime_s / 3600);
  return `A checked key is kept encrypted in this browser for up to ${plural(hours, "hour")}, even if you ` +
         "close the browser. Remove, Sign out or switching this off ends it at once, on our server too.";
}

function keyState(k) {
  const until = `until ${timeOf(k.expires_at)}`;
  if (k.usable && k.key_status === "valid") return ["", `works · kept ${until}`];
  if (k.usable) return ["wait", `${k.key_message || k.key_status} · kept ${until}`];
  return ["bad", k.key_message || `last check: ${k.key_status.replace(/_/g, " ")}`];
}

function renderKeys() {
  const s = state.settings;
  const list = $("keys");
  list.replaceChildren();
  $("keys-box").hidden = !s.byok || s.keys.length === 0;
  for (const k of s.keys) {
    const li = document.createElement("li");
    const text = document.createElement("div");
    const title = document.createElement("strong");
    title.textContent = `${k.name} ${k.key_hint}`;
    const [kind, words] = keyState(k);
    const note = document.createElement("span");
    note.className = "state " + kind;
    setText(note, words);
    text.append(title, note);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove your ${k.name} key ${k.key_hint}`);
    remove.dataset.provider = k.provider;
    remove.addEventListener("click", onRemove);
    li.append(text, remove);
    list.append(li);
  }
}

function renderKeyStatus() {
  const s = state.settings;
  const provider = $("provider").value;
  const note = state.keyNotes[provider];
  const held = s.keys.find((k) => k.provider === provider);
  if (note) { setStatus(note.kind, note.text); return; }
  if (!s.byok) { setStatus("", ""); return; }
  if (held && held.usable) {
    setStatus("valid", held.key_status === "valid" ? `Key ${held.key_hint} works. Chat uses no credits.`
      : (held.key_message || `Key ${held.key_hint}: ${held.key_status}`));
  } else if (held) {
    setStatus("error", held.key_message || `Key ${held.key_hint} failed its last check.`);
  } else {
    setStatus("notice", s.key_message || `Paste your ${NAMES[provider]} API key and press Check.`);
  }
}

function renderSettings() {
  const s = state.settings;
  // While a later change is still on its way, an earlier answer does not put back what the user changed.
  if (!state.pendingSaves) {
    $("provider").value = s.provider;
    if ($("model").dataset.provider !== s.provider || $("model").value !== s.model) {
      fillModels(s.provider, s.model);
      $("model").dataset.provider = s.provider;
    }
    setSwitch(s.byok);
  }
  const name = NAMES[s.provider];
  $("api-key-label").textContent = `Your ${name} API key`;
  const held = s.keys.find((k) => k.provider === s.provider);
  $("api-key").placeholder = held ? held.key_hint : ""; // the key in use; pasting a new one replaces it
  $("key-lifetime").textContent = lifetimeText();
  $("fallback-row").hidden = !s.byok;
  $("fallback").checked = s.fallback_to_platform;
  renderKeys();
  renderKeyStatus();
  renderAll();
}

function setSwitch(on) {
  $("byok").setAttribute("aria-checked", on ? "true" : "false");
  $("key-fields").hidden = !on;
}

async function refreshBalance() {
  const r = await api("/api/balance");
  state.balance = r.ok ? r.body.available : null;  // what a new call can use: balance less holds
  state.held = r.ok ? r.body.held : 0;
  renderAll();
}

async function loadSettings() {
  const r = await api("/api/model-settings");
  if (r.status === 401) return showSignIn();
  state.settings = r.body;
  renderSettings();
}

async function saveSettings(extra = {}) {
  const body = { provider: $("provider").value, model: $("model").value,
                 use_own_key: $("byok").getAttribute("aria-checked") === "true", ...extra };
  // Saves go to the server one at a time, in the order they were made. Sent side by side, a provider
  // and then its model could be applied the other way round: the server would keep the provider's first
  // model while the page shows the one chosen, and the call would run (and be charged) on the first.
  // A message sent right after a change waits for all of them (onSend): the call runs on what the page shows.
  state.pendingSaves += 1;
  const saving = state.saving.then(() => api("/settings/model", { json: body }));
  state.saving = saving.catch(() => {});
  try {
    const r = await saving;
    if (r.body.settings) state.settings = r.body.settings;
    return r;
  } finally {
    state.pendingSaves -= 1;
  }
}

async function onCheck() {
  const provider = $("provider").value;
  const key = $("api-key").value.trim();
  if (!key) {
    setStatus("error", `Paste your ${NAMES[provider]} API key first.`);
    $("api-key").focus();
    return;
  }
  $("check").setAttribute("aria-disabled", "true");
  setStatus("checking", "Checking your key…");
  try {
    const r = await saveSettings({ use_own_key: true, api_key: key });
    if (r.ok) {
      $("api-key").value = "";
      state.keyNotes[provider] = { kind: "valid", text: `Valid: ${r.body.message}` };
    } else {
      const wait = r.body.status === "rate_limited";
      state.keyNotes[provider] = { kind: wait ? "notice" : "error", text: r.body.message || "The key could not be checked." };
    }
    renderSettings();
  } catch (e) {
    setStatus("error", "The server did not answer. Try again.");
  } finally {
    $("check").removeAttribute("aria-disabled");
  }
}

async function onSwitch() {
  const on = $("byok").getAttribute("aria-checked") !== "true";
  setSwitch(on);
  state.keyNotes = {};
  const r = await saveSettings({ use_own_key: on });
  if (!r.ok) { setStatus("error", r.body.message || "The change was not saved."); return; }
  renderSettings();
  // Say what happened, including the keys that switching off removed.
  if (!on) setStatus("notice", r.body.message);
  await refreshBalance();
}

async function onRemove(event) {
  const provider = event.currentTarget.dataset.provider;
  const r = await api(`/api/keys/${provider}`, { method: "DELETE" });
  if (r.body.settings) state.settings = r.body.settings;
  state.keyNotes[provider] = { kind: "notice", text: r.body.message || "The key could not be removed." };
  renderSettings();
  // The Remove button is gone: keep the keyboard user in the same part of the form.
  const next = $("keys").querySelector("button") || $("api-key");
  next.focus();
}

async function onFallback() {
  const r = await saveSettings({ fallback_to_platform: $("fallback").checked });
  if (r.ok) renderSettings(); else setStatus("error", r.body.message || "The change was not saved.");
}

async function onProviderOrModel(event) {
  if (event.target.id === "provider") {
    fillModels($("provider").value, null);
    $("model").dataset.provider = $("provider").value;
  }
  describeModel();
  const r = await saveSettings();
  if (r.ok) renderSettings(); else setStatus("error", r.body.message);
}

// --- the conversation ----------------------------------------------------------------------------

function billingText(body) {
  const b = body.billing;
  if (body.ending === "stopped" && b.decision === "debited") {
    return ["platform", `Stopped after the answer started: ${credits(b.credits)} charged`];
  }
  if (b.decision === "not_billed_byok") return ["byok", "Your key: no credits"];
  if (b.decision === "debited") {
    const left = b.balance_after === null ? "" : ` · ${b.balance_after} left`;
    const how = body.fallback ? "Platform credits (fallback)" : "Platform";
    return [body.fallback ? "fallback" : "platform", `${how}: ${credits(b.credits)} charged${left}`];
  }
  return ["error", b.summary || "No credits"];
}

function addEntry(message, feature) {
  const li = document.createElement("li");
  const you = document.createElement("p");
  you.className = "you";
  const shown = message.length > 600 ? `${message.slice(0, 600)}… (${message.length.toLocaleString()} characters)` : message;
  setText(you, `You (${FEATURES[feature]}): ${shown}`);
  const answer = document.createElement("p");
  answer.className = "answer";
  answer.textContent = "…";
  const notice = document.createElement("p");
  notice.className = "notice";
  notice.hidden = true;
  const billing = document.createElement("span");
  billing.className = "billing";
  li.append(you, answer, notice, billing);
  $("transcript").append(li);
  li.scrollIntoView({ block: "nearest" });
  return { answer, notice, billing };
}

// One Idempotency-Key per message. It is reused only when the page could not learn what became of the
// message (the connection dropped): the server treats the same key as the same call, never a second charge.
function keyFor(message, feature) {
  const again = state.retry && state.retry.message === message && state.retry.feature === feature;
  const key = again ? state.retry.key : crypto.randomUUID();
  state.retry = null;
  return key;
}

// What Stop costs, said before it is pressed (DESIGN "The call lifecycle").
function stopNote(feature) {
  const f = state.settings && state.settings.features[feature];
  if (!f || f.runs_on === "your_key") return "Stop ends the answer where it is; your key pays the provider for what it wrote.";
  return `Stop is free until the answer starts; once text has appeared the call is charged in full (${credits(f.credits || 0)}).`;
}

// Server-Sent Events from a fetch: calls onEvent(name, data) for each event of the stream.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

function showAnswer(entry, r) {
  if (r.ok) {
    setText(entry.answer, r.body.reply || (r.body.ending === "stopped" ? "(stopped before the answer started)" : ""));
    if (r.body.answer_dropped) setText(entry.answer, "(This answer is no longer kept; its billing is below.)");
    const [kind, text] = billingText(r.body);
    entry.billing.className = "billing " + kind;
    entry.billing.textContent = text;
    if (r.body.notice) { entry.notice.hidden = false; setText(entry.notice, r.body.notice); }
    if (r.body.billing.balance_after !== null && r.body.billing.charged) {
      state.balance = r.body.billing.balance_after; state.held = 0; renderAll();
    }
    return;
  }
  if (r.streamed) {
    // Text had arrived before the call failed: keep it, and say why it ends there.
    entry.notice.hidden = false;
    setText(entry.notice, r.body.message || `Error ${r.status}`);
  } else {
    setText(entry.answer, r.body.message || `Error ${r.status}`);
  }
  entry.billing.className = "billing error";
  // Refused before the provider was asked: nothing charged, and only a 402 is about credits.
  entry.billing.textContent = r.body.billing || r.body.ending ? "Failed call: no credits"
    : r.body.reason === "unpriced_model" ? "Not sent: no platform price"
    : r.body.reason === "settings_changed" ? "Not sent: your settings changed"
    : r.status === 402 ? "Not sent: not enough credits" : "Not sent: nothing charged";
}

// What the page shows for a feature's call; the server runs the call on that or refuses it (409), so a
// change made in another tab is never charged unseen.
function shownFor(feature) {
  const f = state.settings && state.settings.features[feature];
  return f ? { key_source: f.key_source, model: f.model, credits: f.credits } : null;
}

// After a dropped connection or a Stop: ask the server what became of the call, without starting one.
async function settleOutcome(entry, key, message, feature, stopped) {
  for (let i = 0; i < 120; i++) {
    const r = await api(`/api/calls/${encodeURIComponent(key)}`);
    if (r.status === 0) {
      state.retry = { message, feature, key };
      setText(entry.answer, "The connection dropped and the server cannot be reached to check whether the message " +
        "went through. Press Send again when you are back online: it is the same message and is never charged twice.");
      entry.billing.className = "billing error";
      entry.billing.textContent = "Unknown yet: never charged twice";
      return false;
    }
    if (r.status === 401) return false;
    if (r.status === 404) {
      state.retry = { message, feature, key };
      setText(entry.answer, "The message did not reach the server, so nothing was charged. Press Send again to send it.");
      entry.billing.className = "billing error";
      entry.billing.textContent = "Not sent: nothing charged";
      return false;
    }
    if (r.ok && r.body.state === "ended") {
      showAnswer(entry, { ok: r.body.status === 200, status: r.body.status, body: r.body.answer });
      return true;
    }
    if (i === 0 && !stopped) {
      setText(entry.answer, "The connection dropped, but the call may have gone through: waiting for its outcome…");
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  state.retry = { message, feature, key };
  return false;
}

async function onSend(event) {
  event.preventDefault();
  if (state.sending) return;
  const message = $("chat-input").value.trim();
  if (!message) { $("chat-input").focus(); return; }
  const feature = $("feature").value;
  const key = keyFor(message, feature);
  // Not `disabled`: a disabled button drops the keyboard focus to the page body.
  state.sending = true;
  $("send").setAttribute("aria-disabled", "true");
  await state.saving;  // a provider or model just chosen is saved before the call that uses it
  const entry = addEntry(message, feature);
  const controller = new AbortController();
  $("stop").hidden = false;
  $("stop").onclick = () => controller.abort();
  $("stop-note").hidden = false;
  $("stop-note").textContent = stopNote(feature);
  // A billable call holds its price while it runs: show it if the call is still running by then.
  const showHeld = setTimeout(refreshBalance, 400);
  let sent = false;
  try {
    const response = await fetch("/chat", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "Idempotency-Key": key },
      body: JSON.stringify({ feature, message, stream: true, shown: shownFor(feature) }),
      signal: controller.signal,
    });
    let final = null;
    if ((response.headers.get("content-type") || "").startsWith("text/event-stream")) {
      let text = "";
      await readEvents(response, (name, data) => {
        if (name === "delta") {
          text += data.text;
          entry.answer.textContent = text;
        } else if (name === "done" || name === "error") {
          final = { ok: name === "done", status: name === "done" ? 200 : 502, body: data, streamed: text !== "" };
        }
      });
      if (final === null) throw new Error("the stream ended before its final event");
    } else {
      let body = {};
      try { body = await response.json(); } catch (_) { /* empty body */ }
      final = { ok: response.ok, status: response.status, body };
    }
    showAnswer(entry, final);
    sent = final.ok;
    if (!final.ok && (final.body.key_status || final.status === 409)) {
      delete state.keyNotes[$("provider").value]; // the server's word on the key is newer
      await loadSettings();
    }
  } catch (e) {
    const stopped = controller.signal.aborted;
    if (stopped) entry.notice.hidden = true;
    sent = await settleOutcome(entry, key, message, feature, stopped);
  } finally {
    clearTimeout(showHeld);
    state.sending = false;
    $("send").removeAttribute("aria-disabled");
    $("stop").hidden = true;
    $("stop-note").hidden = true;
    entry.billing.scrollIntoView({ block: "nearest" });
    if (document.activeElement === document.body || document.activeElement === $("send") ||
        document.activeElement === $("stop")) $("chat-input").focus();
  }
  if (sent) { $("chat-input").value = ""; renderCounter(); }
  // The debit is applied by the credit service a moment later: read the real balance and usage then.
  setTimeout(() => { refreshBalance(); loadUsage(); }, 800);
  setTimeout(loadUsage, 3000);
}

// --- usage ---------------------------------------------------------------------------------------

const OUTCOMES = { debited: "charged", not_billed_byok: "free", not_billed_failed: "failed: free", rejected: "rejected" };

async function loadUsage() {
  const r = await api("/api/usage");
  const body = $("usage").tBodies[0];
  if (!r.ok) {
    $("usage-note").textContent = r.body.message || "Your usage cannot be read right now.";
    return;
  }
  state.lastGrant = r.body.last_grant;
  $("usage-note").textContent = r.body.calls.length ? "Your last 50 calls, as the credit ledger recorded them."
    : "No calls yet.";
  body.replaceChildren();
  for (const c of r.body.calls) {
    const tr = document.createElement("tr");
    if (c.decision === "debited") tr.className = "charged";
    const cells = [new Date(c.time).toLocaleString([], { dateStyle: "short", timeStyle: "short" }),
                   FEATURES[c.feature] || c.feature, `${NAMES[c.provider] || c.provider} ${c.model}`,
                   c.key_source === "byok" ? "your key" : "platform", OUTCOMES[c.decision] || c.decision,
                   String(c.credits)];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === cells.length - 1) td.className = "num";
      tr.append(td);
    });
    body.append(tr);
  }
  renderLowBalance();
}

// --- sign-in -------------------------------------------------------------------------------------

function showSignIn(note = "") {
  state.signedIn = false;
  state.settings = null;
  $("signin-note").hidden = !note;
  $("signin-note").textContent = note;
  state.keyNotes = {};
  $("app").hidden = true;
  $("who").hidden = true;
  $("badge").hidden = true;
  $("skip").hidden = true;
  $("signin").hidden = false;
  if (!state.config.dev_login) {
    $("signin-form").querySelector("button").disabled = true;
    $("signin-help").textContent = "Dev sign-in is off here; use a signed token (byok-token) with the API.";
  }
  $("user-id").focus();
}

async function showApp() {
  const me = await api("/api/me");
  if (!me.ok) return showSignIn();
  state.signedIn = true;
  $("signin-note").hidden = true;
  $("who-name").textContent = me.body.user_id;
  $("signin").hidden = true;
  $("who").hidden = false;
  $("skip").hidden = false;
  $("app").hidden = false;
  await loadSettings();
  await Promise.all([refreshBalance(), loadUsage()]);
}

async function onSignIn(event) {
  event.preventDefault();
  $("signin-error").textContent = "";
  const r = await api("/auth/dev-login", { json: { user_id: $("user-id").value.trim() } });
  if (!r.ok) { $("signin-error").textContent = r.body.message || "Sign-in failed."; return; }
  $("transcript").replaceChildren();
  await showApp();
  $("chat-input").focus(); // where the user works next, not the page body
}

async function onLogout(everywhere) {
  await api(everywhere ? "/auth/logout-everywhere" : "/auth/logout", { method: "POST" });
  $("transcript").replaceChildren();
  $("usage").tBodies[0].replaceChildren();
  setStatus("", "");
  showSignIn(everywhere ? "You are signed out everywhere: every tab and device must sign in again." : "");
}

async function checkSession() {
  if (!state.signedIn || document.hidden) return;
  await api("/api/me"); // a 401 shows the sign-in form; a 200 renews the session's short-lived token
}

function renderCounter() {
  const n = $("chat-input").value.length;
  const el = $("counter");
  el.textContent = `${n.toLocaleString()} / ${MAX_MESSAGE.toLocaleString()} characters`;
  el.className = "counter" + (n >= MAX_MESSAGE ? " over" : "");
}

async function start() {
  state.config = (await api("/api/config")).body;
  const providers = $("provider");
  for (const p of Object.keys(state.config.models)) {
    const option = document.createElement("option");
    option.value = p;
    option.textContent = NAMES[p] || p;
    providers.append(option);
  }
  $("signin-form").addEventListener("submit", onSignIn);
  $("logout").addEventListener("click", () => onLogout(false));
  $("byok").addEventListener("click", onSwitch);
  $("check").addEventListener("click", () => { if (!$("check").hasAttribute("aria-disabled")) onCheck(); });
  $("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); onCheck(); } });
  $("provider").addEventListener("change", onProviderOrModel);
  $("model").addEventListener("change", onProviderOrModel);
  $("fallback").addEventListener("change", onFallback);
  $("feature").addEventListener("change", renderFeatureStatus);
  $("chat-form").addEventListener("submit", onSend);
  $("usage-refresh").addEventListener("click", () => { refreshBalance(); loadUsage(); });
  $("logout-everywhere").addEventListener("click", () => onLogout(true));
  $("chat-input").addEventListener("input", renderCounter);
  // Another tab may sign out: ask now and then, and whenever this tab comes back into view.
  setInterval(checkSession, 30000);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) checkSession(); });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  // Escape closes the tooltip where it is, without moving the focus away.
  const tip = document.querySelector(".tip");
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") tip.classList.add("dismissed"); });
  tip.addEventListener("focusout", () => tip.classList.remove("dismissed"));
  tip.addEventListener("mouseleave", () => tip.classList.remove("dismissed"));
  await showApp();
}

start();
