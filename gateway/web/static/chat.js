// One streamed answer: sends the request, renders each event as it arrives (the gateway paces them), reports
// to the gateway what has been rendered and is in view, and polls the stream's state for the side panel.

import { sseEvents } from "./sse.js";

const REPORT_EVERY_MS = 500;
const POLL_EVERY_MS = 250;

export class ChatStream {
  // view: {answer (element), log (scrolling element), onState(state), onTrace(entry)}
  constructor(view) {
    this.view = view;
    this.controller = new AbortController();
    this.sid = null;
    this.rendered = 0;      // tokens on screen
    this.seen = 0;          // tokens that have been on screen and in view
    this.reported = 0;      // last count the gateway accepted
    this.live = false;      // the gateway still has the stream (no finish event yet)
    this.timers = [];
    this.spans = [];        // [{el, n}] one per rendered event
    this.follow = true;     // keep the end of the answer in view, until the reader scrolls up
    this.polling = false;   // one status poll in flight at a time
    this.reporting = false; // one progress report in flight at a time (a late one would go backwards)
  }

  // The log scrolled (by the reader, or by render() following the answer): follow again only from the bottom.
  onScroll() {
    const log = this.view.log;
    this.follow = log.scrollHeight - log.scrollTop - log.clientHeight < 8;
    this.look();
  }

  async run(body) {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: this.controller.signal,
    });
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({}));
      throw new Error(err?.error?.message || `HTTP ${resp.status}`);
    }
    this.sid = resp.headers.get("X-TokenFlow-Stream-Id");
    this.live = true;
    this.timers.push(setInterval(() => this.report(), REPORT_EVERY_MS));
    this.timers.push(setInterval(() => this.poll(), POLL_EVERY_MS));
    this.poll();
    let finish = null;
    try {
      for await (const ev of sseEvents(resp.body)) {
        if (ev.data === "[DONE]") break;
        const obj = JSON.parse(ev.data);
        if (obj.error) throw new Error(obj.error.message);
        const choice = obj.choices && obj.choices[0];
        if (!choice) continue;  // a usage chunk
        const n = ev.id ? Number(ev.id.slice(ev.id.lastIndexOf(":") + 1)) : this.rendered;
        const text = choice.delta ? choice.delta.content : choice.text;
        if (text) this.render(text, n);
        if (choice.finish_reason) {
          finish = choice.finish_reason;
          this.end();  // the gateway drops the stream right after its last event: no more polls or reports
        }
      }
    } finally {
      this.end();
    }
    return finish;
  }

  render(text, n) {
    const { answer, log } = this.view;
    // Follow only from the bottom, judged now: the scroll event of a reader who just scrolled up may not have
    // run yet, and following on the stale flag would pull the log back down under them.
    this.follow = this.follow && log.scrollHeight - log.scrollTop - log.clientHeight < 8;
    const span = document.createElement("span");
    span.textContent = text;
    answer.appendChild(span);
    this.spans.push({ el: span, n });
    this.rendered = n;
    if (this.follow) log.scrollTop = log.scrollHeight;
    this.view.onTrace({ t: performance.now(), n, chars: text.length });
    this.look();
  }

  // What the reader can see: every rendered event up to the last one inside the log's visible area, while the
  // page itself is visible. Scrolled away, the count waits until the text is in view again.
  look() {
    if (document.visibilityState !== "visible" || !this.spans.length) return;
    const box = this.view.log.getBoundingClientRect();
    const bottom = Math.min(box.bottom, window.innerHeight);
    let lo = 0, hi = this.spans.length - 1, last = -1;
    while (lo <= hi) {  // spans are in reading order: the last one whose top is above the visible bottom
      const mid = (lo + hi) >> 1;
      const r = this.spans[mid].el.getBoundingClientRect();
      if (r.top < bottom && r.bottom > box.top) { last = mid; lo = mid + 1; }
      else if (r.top >= bottom) hi = mid - 1;
      else lo = mid + 1;
    }
    if (last >= 0) this.seen = Math.max(this.seen, this.spans[last].n);
  }

  async report() {
    this.look();
    if (!this.live || this.reporting || this.seen <= this.reported) return;
    const n = this.seen;
    this.reporting = true;
    try {
      const r = await fetch(`/v1/streams/${this.sid}/progress`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ consumed_tokens: n }),
      });
      if (r.ok) this.reported = n;
      else if (r.status === 404) this.end();  // it ended in the meantime
    } catch (e) {
      // a failed report is sent again, with the newer count, on the next tick
    } finally {
      this.reporting = false;
    }
  }

  async poll() {
    if (!this.live || this.polling) return;
    this.polling = true;
    try {
      const r = await fetch(`/v1/streams/${this.sid}`);
      if (r.ok && this.live) this.view.onState(await r.json(), this);
      else if (r.status === 404) this.end();  // it ended between two polls
    } catch (e) {
      // a failed poll is retried on the next tick
    } finally {
      this.polling = false;
    }
  }

  end() {
    this.live = false;
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
  }

  stop() {
    this.end();
    this.controller.abort();
  }
}
