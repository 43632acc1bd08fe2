// The connection to the daemon: server-sent events (`state`, the whole state as JSON) on the
// page's own token, the connection pill, and how long ago the last state came.
// The browser retries a dropped event stream by itself, but gives up for good once a try is
// answered an HTTP error (a 503 when the daemon's stream limit is reached, a proxy's 502
// while the daemon restarts): here any failure closes the stream and a new one is tried after
// 1 s, doubling up to 30 s, back to 1 s once a state comes. Meanwhile the pill says when, and
// the last state stays shown, marked as not live (and how old). A `stale` event says the
// stream is open but the daemon builds no new state (a part of it does not answer): the
// pill says "stalled" and the last state (the event's own on a new stream) is marked so,
// with its age, until a new state comes.

import { $, ago } from "./format.js{{query}}";

const token = new URLSearchParams(window.location.search).get("token");
const query = token ? "?token=" + encodeURIComponent(token) : "";
const FIRST_RETRY_S = 1, MAX_RETRY_S = 30;
let lastMessageAt = null;
let live = false;  // a stream is open and has sent a state
let stalled = false;  // a stream is open but says its newest state is stale
let retryS = FIRST_RETRY_S;  // the wait before the next try after a failure
let retryAt = null;  // when the next try is due (ms), while waiting for it

function setConn(text, cls) {
  const c = $("conn");
  c.textContent = text;
  c.className = "pill " + cls;
}

// the page is live, or shows the last state it got as what it is: not live, and how old
function showStale(stale) {
  const marked = stale && lastMessageAt !== null;  // nothing shown yet: nothing to mark
  document.body.classList.toggle("stale", marked);
  const note = $("conn-stale");
  note.hidden = !marked;
  const age = ago((Date.now() - lastMessageAt) / 1000);
  note.textContent = !marked ? "" : stalled
    ? "not live: the daemon's state is not being updated (a part of the daemon does not " +
      "answer); what is shown is its last state, built " + age + ", and may be out of date"
    : "not live: the daemon's stream is down; what is shown is its last state, received " +
      age + ", and may be out of date";
}

function tick() {
  if (lastMessageAt !== null) $("age").textContent = "updated " + ago((Date.now() - lastMessageAt) / 1000);
  if (retryAt !== null) {
    setConn(`reconnecting in ${Math.max(1, Math.ceil((retryAt - Date.now()) / 1000))} s`, "warn");
  }
  if (!live) showStale(true);
}

// app: the page's state object (state, messages, source); changed: called on each new state
export function connect(app, changed) {
  retryAt = null;
  const source = new EventSource("events" + query);
  source.addEventListener("error", () => {
    if (app.source !== source) return;  // an earlier stream's
    source.close();  // the browser's own retry stops at an HTTP error: ours goes on
    live = false;
    stalled = false;
    retryAt = Date.now() + 1000 * retryS;
    setTimeout(() => connect(app, changed), 1000 * retryS);
    retryS = Math.min(2 * retryS, MAX_RETRY_S);
    tick();
  });
  source.addEventListener("state", (ev) => {
    try {
      app.state = JSON.parse(ev.data);
    } catch (err) {
      return;
    }
    app.messages += 1;
    lastMessageAt = Date.now();
    retryS = FIRST_RETRY_S;
    live = true;
    stalled = false;
    setConn("live", "ok");
    showStale(false);
    changed();
  });
  source.addEventListener("stale", (ev) => {
    let mark;
    try {
      mark = JSON.parse(ev.data);
    } catch (err) {
      return;
    }
    if (mark.state) {  // a new stream's first: the last state there is, not current
      app.state = mark.state;
      app.messages += 1;
      changed();
    }
    if (app.state && typeof mark.age_s === "number") lastMessageAt = Date.now() - 1000 * mark.age_s;
    retryS = FIRST_RETRY_S;  // the stream is open: only the daemon's state is not current
    live = false;
    stalled = true;
    setConn("stalled", "warn");
    showStale(true);
  });
  if (app.source) setConn("reconnecting…", "warn");
  app.source = source;
}

setInterval(tick, 1000);
