// The burst panel: starts a burst of simulated users on every engine and draws, side by side, what each user
// saw: a row per user, grey while it waits for its first word, green while it reads, red while it stalls.

const POLL_EVERY_MS = 250;
const COLORS = { wait: "#b9bec8", read: "#2f9e6e", stall: "#d93b30", axis: "#6b7280" };
const LABELS = { tokenflow: "TokenFlow", fcfs: "FCFS (a plain engine)", andes: "Andes" };

export class BurstPanel {
  constructor({ form, users, tokens, button, status, lanes }) {
    Object.assign(this, { form, users, tokens, button, status, lanesEl: lanes });
    this.timer = null;
    this.last = null;
    form.addEventListener("submit", (e) => { e.preventDefault(); this.start(); });
    new ResizeObserver(() => this.last && this.draw(this.last)).observe(lanes);
  }

  async load(maxUsers) {
    this.users.max = String(maxUsers);
    const state = await (await fetch("/demo/burst")).json();
    this.show(state);
    if (state.status === "running") this.follow();
  }

  async start() {
    const body = { users: Number(this.users.value), output_tokens: Number(this.tokens.value) };
    this.button.disabled = true;
    const r = await fetch("/demo/burst", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const state = await r.json();
    if (!r.ok) {
      this.status.textContent = state.error ? state.error.message : `HTTP ${r.status}`;
      this.button.disabled = false;
      return;
    }
    this.show(state);
    this.follow();
  }

  follow() {
    this.button.disabled = true;
    clearInterval(this.timer);
    this.timer = setInterval(async () => {
      const state = await (await fetch("/demo/burst")).json();
      this.show(state);
      if (state.status !== "running") {
        clearInterval(this.timer);
        this.button.disabled = false;
      }
    }, POLL_EVERY_MS);
  }

  show(state) {
    this.last = state;
    if (state.status === "idle") {
      this.status.textContent = "No burst yet.";
      return;
    }
    const what = state.status === "running" ? "running" : state.status === "failed" ? `failed: ${state.error}` : "done";
    this.status.textContent = `${state.users} users per engine, ${state.output_tokens}-token answers: ${what} (${state.elapsed_s.toFixed(1)} s)`;
    this.draw(state);
  }

  draw(state) {
    const lanes = state.lanes;
    if (this.lanesEl.children.length !== lanes.length) {
      this.lanesEl.replaceChildren(...lanes.map(() => laneElement()));
    }
    // One time axis for every lane, so the pictures compare at a glance.
    let span = Math.max(1, state.elapsed_s);
    for (const lane of lanes) for (const row of lane.rows) span = Math.max(span, row[1] || 0);
    lanes.forEach((lane, i) => fillLane(this.lanesEl.children[i], lane, span));
  }
}

function laneElement() {
  const el = document.createElement("figure");
  el.className = "lane";
  el.innerHTML = `<figcaption><strong class="policy"></strong> <span class="engine"></span></figcaption>
    <dl class="figures">
      <div><dt>Median wait for the first word</dt><dd class="p50"></dd></div>
      <div><dt>Slowest wait (p99)</dt><dd class="p99"></dd></div>
      <div><dt>Time stalled mid-answer</dt><dd class="stall"></dd></div>
      <div><dt>Users served</dt><dd class="served"></dd></div>
    </dl>
    <canvas role="img"></canvas>`;
  return el;
}

function fmt(s) { return s == null ? "–" : `${s.toFixed(s < 10 ? 2 : 1)} s`; }

function fillLane(el, lane, span) {
  el.dataset.policy = lane.policy;
  el.querySelector(".policy").textContent = LABELS[lane.policy] || lane.policy;
  el.querySelector(".engine").textContent = `engine ${lane.engine}, model ${lane.model}`;
  el.querySelector(".p50").textContent = fmt(lane.ttft_p50_s);
  el.querySelector(".p99").textContent = fmt(lane.ttft_p99_s);
  el.querySelector(".stall").textContent = `${fmt(lane.stall_s)} (${lane.stalled_users} users)`;
  el.querySelector(".served").textContent = `${lane.started} of ${lane.users} started` + (lane.errors ? `, ${lane.errors} errors` : "");
  const canvas = el.querySelector("canvas");
  canvas.setAttribute("aria-label", `${LABELS[lane.policy] || lane.policy}: median wait ${fmt(lane.ttft_p50_s)}, ` +
    `p99 ${fmt(lane.ttft_p99_s)}, ${fmt(lane.stall_s)} stalled, one row per user over ${span.toFixed(0)} s`);
  drawRows(canvas, lane.rows, span);
}

function drawRows(canvas, rows, span) {
  const dpr = window.devicePixelRatio || 1;
  const width = Math.max(120, canvas.clientWidth);
  const rowH = Math.max(2, Math.min(6, 240 / Math.max(1, rows.length)));
  const axisH = 16;
  const height = Math.ceil(rows.length * rowH) + axisH;
  canvas.style.height = `${height}px`;
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  const x = (t) => (t / span) * (width - 1);
  rows.forEach(([ttft, readUntil, , , stalls], i) => {
    const y = i * rowH, h = Math.max(1, rowH - 1);
    g.fillStyle = COLORS.wait;
    g.fillRect(0, y, x(ttft == null ? span : ttft), h);
    if (ttft == null) return;
    g.fillStyle = COLORS.read;
    g.fillRect(x(ttft), y, Math.max(1, x(readUntil) - x(ttft)), h);
    g.fillStyle = COLORS.stall;
    for (const [a, b] of stalls) g.fillRect(x(a), y, Math.max(1, x(b) - x(a)), h);
  });
  // time axis: a tick every few seconds
  const y0 = rows.length * rowH + 2;
  g.fillStyle = COLORS.axis;
  g.font = "11px system-ui, sans-serif";
  const step = span > 60 ? 20 : span > 20 ? 5 : span > 8 ? 2 : 1;
  for (let t = 0; t <= span; t += step) {
    g.fillRect(x(t), y0, 1, 4);
    g.fillText(`${t}s`, Math.min(x(t) + 2, width - 24), y0 + 12);
  }
}
