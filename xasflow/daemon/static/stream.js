// The connection to the daemon: server-sent events (`state`, the whole state as JSON) on the
// page's own token, the connection pill, and how long ago the last state came.

import { $, ago } from "./format.js{{query}}";

const token = new URLSearchParams(window.location.search).get("token");
const query = token ? "?token=" + encodeURIComponent(token) : "";
let lastMessageAt = null;

function setConn(text, cls) {
  const c = $("conn");
  c.textContent = text;
  c.className = "pill " + cls;
}

// app: the page's state object (state, messages, source); changed: called on each new state
export function connect(app, changed) {
  const source = new EventSource("events" + query);
  source.addEventListener("open", () => setConn("live", "ok"));
  source.addEventListener("error", () => setConn(
    source.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting…", "warn"));
  source.addEventListener("state", (ev) => {
    try {
      app.state = JSON.parse(ev.data);
    } catch (err) {
      return;
    }
    app.messages += 1;
    lastMessageAt = Date.now();
    setConn("live", "ok");
    changed();
  });
  app.source = source;
}

setInterval(() => {
  if (lastMessageAt !== null) $("age").textContent = "updated " + ago((Date.now() - lastMessageAt) / 1000);
}, 1000);
