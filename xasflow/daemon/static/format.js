// Formatting of values for the page, and the few DOM builders every panel uses. Text goes in
// through textContent only: document data comes from the network and is never parsed as HTML.

export const $ = (id) => document.getElementById(id);

export function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  return v.toFixed(digits === undefined ? 2 : digits);
}
export function pct(p) { return p === null || p === undefined ? "–" : (100 * p).toFixed(0) + " %"; }
export function short(uid) { return uid ? String(uid).slice(0, 8) : "–"; }
export function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
export function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
export function rows(table, header, body) {
  clear(table);
  if (header) {
    const tr = el("tr");
    header.forEach((h) => tr.appendChild(el("th", null, h)));
    table.appendChild(tr);
  }
  body.forEach((r) => {
    const tr = el("tr");
    r.forEach((c) => tr.appendChild(el("td", typeof c === "number" ? "num" : null,
      typeof c === "number" ? fmt(c, Number.isInteger(c) ? 0 : 2) : c)));
    table.appendChild(tr);
  });
}
// floored, never rounded up (90 s is not "2 min ago"): seconds below two minutes, then minutes
// below two hours, then hours
export function ago(seconds) {
  if (seconds < 1) return "just now";
  if (seconds < 120) return Math.floor(seconds) + " s ago";
  if (seconds < 7200) return Math.floor(seconds / 60) + " min ago";
  return Math.floor(seconds / 3600) + " h ago";
}
