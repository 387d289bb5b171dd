// The settings/chat page: plain JS, no build step. Identity and the user's key live in HttpOnly
// cookies this script cannot read; it only ever sees the key's hint.
"use strict";

const $ = (id) => document.getElementById(id);
const NAMES = { openai: "OpenAI", anthropic: "Anthropic", groq: "Groq", gemini: "Gemini" };
const state = { config: null, settings: null, balance: null, held: 0, keyProvider: null };

async function api(path, options = {}) {
  const init = { credentials: "same-origin", headers: {}, ...options };
  if (options.json !== undefined) {
    init.method = init.method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, init);
  let body = {};
  try { body = await response.json(); } catch (_) { /* empty body */ }
  return { ok: response.ok, status: response.status, body };
}

function setStatus(kind, text) {
  const el = $("key-status");
  el.className = "status" + (kind ? " " + kind : "");
  el.textContent = text || "";
}

function renderBadge() {
  const badge = $("badge");
  const s = state.settings;
  if (!s) { badge.hidden = true; return; }
  badge.hidden = false;
  if (s.byok && s.key_in_session) {
    badge.className = "badge byok";
    badge.textContent = "Your key: no credits";
  } else if (s.byok) {
    badge.className = "badge attention";
    badge.textContent = "Your key: paste it again";
  } else {
    badge.className = "badge platform";
    const held = state.held ? ` · ${state.held} held by running calls` : "";
    badge.textContent = state.balance === null ? "Platform: credits unknown"
      : `Platform: ${state.balance} credit${state.balance === 1 ? "" : "s"} available${held}`;
  }
}

function fillModels(provider, selected) {
  const select = $("model");
  select.replaceChildren();
  const models = state.config.models[provider] || [];
  const ids = models.map((m) => m.id);
  if (selected && !ids.includes(selected)) models.push({ id: selected, credits: null });
  for (const m of models) {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.credits === null ? `${m.id} (your key only)` : `${m.id} (${m.credits} credits)`;
    select.append(option);
  }
  if (selected) select.value = selected;
  describeModel();
}

function describeModel() {
  const m = (state.config.models[$("provider").value] || []).find((x) => x.id === $("model").value);
  $("model-price").textContent = !m || m.credits === null
    ? "No platform price: this model runs only on your own key."
    : `On platform credits, a chat call costs ${m.credits} credit${m.credits === 1 ? "" : "s"}.`;
}

function renderSettings() {
  const s = state.settings;
  $("provider").value = s.provider;
  fillModels(s.provider, s.model);
  setSwitch(s.byok);
  $("api-key-label").textContent = `Your ${NAMES[$("provider").value]} API key`;
  if (s.byok && s.key_in_session) {
    const shown = s.key_status === "valid" ? `Key ${s.key_hint} works. Chat uses no credits.`
      : (s.key_message || `Key ${s.key_hint}: ${s.key_status}`);
    setStatus(s.key_status === "valid" ? "valid" : "error", shown);
    $("api-key").placeholder = `${s.key_hint} (kept for this session)`;
  } else if (s.byok) {
    setStatus("notice", s.key_message || "Paste your key and press Check.");
    $("api-key").placeholder = "";
  } else {
    $("api-key").placeholder = "";
  }
  renderBadge();
}

function setSwitch(on) {
  $("byok").setAttribute("aria-checked", on ? "true" : "false");
  $("key-fields").hidden = !on;
}

async function refreshBalance() {
  const r = await api("/api/balance");
  state.balance = r.ok ? r.body.available : null;  // what a new call can use: balance less holds
  state.held = r.ok ? r.body.held : 0;
  renderBadge();
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
  const r = await api("/settings/model", { json: body });
  if (r.body.settings) { state.settings = r.body.settings; }
  return r;
}

async function onCheck() {
  const key = $("api-key").value.trim();
  if (!key && !(state.settings.key_in_session && state.settings.provider === $("provider").value)) {
    setStatus("error", `Paste your ${NAMES[$("provider").value]} API key first.`);
    $("api-key").focus();
    return;
  }
  $("check").disabled = true;
  setStatus("checking", "Checking your key…");
  try {
    const r = await saveSettings(key ? { use_own_key: true, api_key: key } : { use_own_key: true });
    if (r.ok) {
      $("api-key").value = "";
      renderSettings();
      setStatus("valid", r.body.status === "valid" ? `Valid: ${r.body.message} Chat now uses no credits.` : r.body.message);
    } else {
      setStatus("error", r.body.message || "The key could not be checked.");
      renderBadge();
    }
  } catch (e) {
    setStatus("error", "The server did not answer. Try again.");
  } finally {
    $("check").disabled = false;
  }
}

async function onSwitch() {
  const on = $("byok").getAttribute("aria-checked") !== "true";
  setSwitch(on);
  if (on) {
    if (state.settings.key_in_session && state.settings.provider === $("provider").value) {
      await saveSettings();
      renderSettings();
    } else {
      setStatus("notice", `Paste your ${NAMES[$("provider").value]} API key and press Check to use it.`);
      $("api-key").focus();
    }
  } else {
    const r = await saveSettings({ use_own_key: false });
    setStatus(r.ok ? "" : "error", r.ok ? "" : r.body.message);
    $("api-key").value = "";
    renderSettings();
    await refreshBalance();
  }
}

async function onProviderOrModel(event) {
  if (event.target.id === "provider") fillModels($("provider").value, null);
  describeModel();
  $("api-key-label").textContent = `Your ${NAMES[$("provider").value]} API key`;
  const byok = $("byok").getAttribute("aria-checked") === "true";
  if (byok && state.settings.provider !== $("provider").value) {
    setStatus("notice", `Paste your ${NAMES[$("provider").value]} API key and press Check to use ${NAMES[$("provider").value]}.`);
    return;
  }
  const r = await saveSettings();
  if (r.ok) renderSettings(); else setStatus("error", r.body.message);
}

function billingText(b) {
  if (b.decision === "not_billed_byok") return ["byok", "Your key: no credits"];
  if (b.decision === "debited") {
    const left = b.balance_after === null ? "" : ` · ${b.balance_after} left`;
    return ["platform", `Platform: ${b.credits} credit${b.credits === 1 ? "" : "s"} charged${left}`];
  }
  return ["error", b.summary || "No credits"];
}

function addEntry(message, feature) {
  const li = document.createElement("li");
  const you = document.createElement("p");
  you.className = "you";
  you.textContent = `You (${$("feature").selectedOptions[0].textContent.split(" (")[0]}): ${message}`;
  const answer = document.createElement("p");
  answer.className = "answer";
  answer.textContent = "…";
  const billing = document.createElement("span");
  billing.className = "billing";
  li.append(you, answer, billing);
  $("transcript").append(li);
  li.scrollIntoView({ block: "end" });
  return { answer, billing };
}

async function onSend(event) {
  event.preventDefault();
  const message = $("chat-input").value.trim();
  if (!message) return;
  const feature = $("feature").value;
  const entry = addEntry(message, feature);
  $("send").disabled = true;
  // A billable call holds its price while it runs: show it if the call is still running by then.
  const showHeld = setTimeout(refreshBalance, 400);
  try {
    const r = await api("/chat", { json: { feature, message } });
    clearTimeout(showHeld);
    if (r.ok) {
      entry.answer.textContent = r.body.reply;
      const [kind, text] = billingText(r.body.billing);
      entry.billing.className = "billing " + kind;
      entry.billing.textContent = text;
      $("chat-input").value = "";
      if (r.body.billing.balance_after !== null) { state.balance = r.body.billing.balance_after; state.held = 0; renderBadge(); }
    } else {
      entry.answer.textContent = r.body.message || `Error ${r.status}`;
      entry.billing.className = "billing error";
      entry.billing.textContent = r.body.billing ? "Failed call: no credits" : "Not sent: no credits";
      if (r.body.key_status) { await loadSettings(); }
    }
  } catch (e) {
    entry.answer.textContent = "The server did not answer. Try again.";
  } finally {
    $("send").disabled = false;
    entry.billing.scrollIntoView({ block: "nearest" });
  }
  // The debit is applied by the credit service a moment later: read the real balance then.
  setTimeout(refreshBalance, 800);
}

function showSignIn() {
  state.settings = null;
  $("app").hidden = true;
  $("who").hidden = true;
  $("badge").hidden = true;
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
  $("who-name").textContent = me.body.user_id;
  $("signin").hidden = true;
  $("who").hidden = false;
  $("app").hidden = false;
  await loadSettings();
  await refreshBalance();
}

async function onSignIn(event) {
  event.preventDefault();
  $("signin-error").textContent = "";
  const r = await api("/auth/dev-login", { json: { user_id: $("user-id").value.trim() } });
  if (!r.ok) { $("signin-error").textContent = r.body.message || "Sign-in failed."; return; }
  $("transcript").replaceChildren();
  await showApp();
}

async function onLogout() {
  await api("/auth/logout", { method: "POST" });
  $("transcript").replaceChildren();
  setStatus("", "");
  showSignIn();
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
  $("logout").addEventListener("click", onLogout);
  $("byok").addEventListener("click", onSwitch);
  $("check").addEventListener("click", onCheck);
  $("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); onCheck(); } });
  $("provider").addEventListener("change", onProviderOrModel);
  $("model").addEventListener("change", onProviderOrModel);
  $("chat-form").addEventListener("submit", onSend);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") document.activeElement.blur(); });
  await showApp();
}

start();
