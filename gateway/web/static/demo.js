// The demo page: wires the chat, the stream's side panel and the burst panel to the page's elements.

import { ChatStream } from "./chat.js";
import { BurstPanel } from "./burst.js";

const $ = (id) => document.getElementById(id);
// Every rendered event's time (performance.now(), ms) and token count, for whoever wants to check the pacing.
const demo = (window.tokenflowDemo = { trace: [], streams: [], info: null });
const history = [];
let current = null;

async function init() {
  const info = await (await fetch("/demo/info")).json();
  demo.info = info;
  const engine = $("engine");
  for (const e of info.engines) {
    const opt = new Option(`${e.policy} (${e.model})`, e.model);
    engine.add(opt);
  }
  const sims = info.engines.filter((e) => e.simulated);
  if (sims.length) {
    $("sim-note").querySelector("strong").textContent = `simulator (profile ${sims[0].profile})`;
  }
  $("ask").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && current) stop(); });
  $("stop").addEventListener("click", stop);
  $("log").addEventListener("scroll", () => current && current.onScroll());
  const burst = new BurstPanel({ form: $("burst-form"), users: $("burst-users"), tokens: $("burst-tokens"),
    button: $("burst-run"), status: $("burst-status"), lanes: $("lanes") });
  await burst.load(info.max_users);
  document.body.dataset.ready = "1";
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("p");
  body.textContent = text;
  div.append(who, body);
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return body;
}

async function send() {
  const prompt = $("prompt").value.trim();
  if (!prompt || current) return;
  $("prompt").value = "";
  bubble("user", prompt);
  history.push({ role: "user", content: prompt });
  const answer = bubble("assistant", "");
  answer.classList.add("streaming");
  $("log").scrollTop = $("log").scrollHeight;
  const body = {
    model: $("engine").value,
    messages: history.slice(-8),
    stream: true,
    max_tokens: Number($("max-tokens").value) || 120,
    tokenflow: { rate: $("rate").value },
  };
  const stream = (current = new ChatStream({
    answer, log: $("log"),
    onState: showState,
    onTrace: (entry) => demo.trace.push({ sid: stream.sid, ...entry }),
  }));
  demo.streams.push(stream);
  setBusy(true);
  status("Streaming…");
  const t0 = performance.now();
  try {
    const finish = await stream.run(body);
    status(finish ? `Done: ${stream.rendered} tokens in ${((performance.now() - t0) / 1000).toFixed(1)} s.` : "Stopped.");
  } catch (e) {
    status(e.name === "AbortError" ? "Stopped." : `Error: ${e.message}`);
  } finally {
    answer.classList.remove("streaming");
    history.push({ role: "assistant", content: answer.textContent });
    current = null;
    setBusy(false);
    $("prompt").focus();
  }
}

function stop() {
  if (current) current.stop();
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function status(text) { $("chat-status").textContent = text; }

const n1 = (v) => (v == null ? "–" : `${Number(v).toFixed(1)} tok/s`);
const s1 = (v) => (v == null ? "–" : `${Number(v).toFixed(1)} s`);

function showState(s, stream) {
  const g = (k) => document.querySelector(`[data-g="${k}"]`);
  g("declared").textContent = s.rate_declared ? n1(s.rate_declared_value) : `none (default ${n1(s.rate)})`;
  g("measured").textContent = s.rate_measured == null ? "none yet (keeping up)" : `${n1(s.rate_measured)} (${s.rate_source})`;
  g("effective").textContent = n1(s.rate);
  g("buffer").textContent = `${s.buffer_tokens} token${s.buffer_tokens === 1 ? "" : "s"}`;
  const full = Math.max(1, s.generated_tokens);
  g("buffer-bar").style.width = `${Math.min(100, (100 * s.buffer_tokens) / full)}%`;
  g("tte").textContent = s1(s.time_to_empty_s);
  g("stall").textContent = s1(s.stall_s);
  g("engine").textContent = s.finished ? "done generating" : s.engine_status;
  g("preemptions").textContent = String(s.preemptions);
  g("tokens").textContent = `${s.generated_tokens} generated · ${s.written_tokens} sent · ${stream.rendered} on screen · ` +
    `${s.reported_tokens ?? 0} read (reported)`;
  document.getElementById("gauges").dataset.updates = String(Number(document.getElementById("gauges").dataset.updates || 0) + 1);
}

init().catch((e) => status(`Could not load the demo: ${e.message}`));
