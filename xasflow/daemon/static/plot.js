// Hand-written canvas line and dot plots for the dashboard (no libraries): axes with round
// ticks, shaded bands, dashed markers, series with gaps where a value is missing.

export const COLORS = {
  line: "#5fb3f9", line2: "#f9a85f", grid: "#2b3442", axis: "#8b97a6", text: "#dbe2ea",
  e0: "#ef6b6b", window: "rgba(95,179,249,0.08)", region: [249, 168, 95], ok: "#5fd38d",
};

function niceTicks(lo, hi, n) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / Math.max(1, n);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9 * span; t += step) out.push(t);
  return out;
}
function extent(arrays, pad) {
  let lo = Infinity, hi = -Infinity;
  arrays.forEach((a) => (a || []).forEach((v) => {
    if (v !== null && Number.isFinite(v)) { if (v < lo) lo = v; if (v > hi) hi = v; }
  }));
  if (!Number.isFinite(lo)) return [0, 1];
  if (lo === hi) { lo -= 0.5; hi += 0.5; }
  const p = (hi - lo) * (pad || 0);
  return [lo - p, hi + p];
}

// opts: {series: [{x, y, color, width, dots, dash}], bands: [{x0, x1, fill, label}],
//        vlines: [{x, color, label}], xlabel, ylabel, xrange, yrange, empty}
export function plot(canvas, opts) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 300, h = canvas.clientHeight || 200;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  const series = (opts.series || []).filter((s) => s.x && s.x.length);
  if (!series.length) {
    ctx.fillStyle = COLORS.axis;
    ctx.fillText(opts.empty || "no data yet", 12, h / 2);
    return;
  }
  const m = { l: 48, r: 10, t: 8, b: 30 };
  const xr = opts.xrange || extent(series.map((s) => s.x), 0);
  const yr = opts.yrange || extent(series.map((s) => s.y), 0.06);
  const X = (v) => m.l + ((v - xr[0]) / (xr[1] - xr[0])) * (w - m.l - m.r);
  const Y = (v) => h - m.b - ((v - yr[0]) / (yr[1] - yr[0])) * (h - m.t - m.b);
  // bands (regions, window) under everything
  (opts.bands || []).forEach((b) => {
    const x0 = Math.max(X(b.x0), m.l), x1 = Math.min(X(b.x1), w - m.r);
    if (x1 <= x0) return;
    ctx.fillStyle = b.fill;
    ctx.fillRect(x0, m.t, x1 - x0, h - m.t - m.b);
    if (b.label) {
      ctx.fillStyle = COLORS.axis;
      ctx.save();
      ctx.beginPath();
      ctx.rect(x0, m.t, x1 - x0, h - m.t - m.b);
      ctx.clip();
      ctx.fillText(b.label, x0 + 3, m.t + 11);
      ctx.restore();
    }
  });
  // grid and ticks
  ctx.strokeStyle = COLORS.grid;
  ctx.fillStyle = COLORS.axis;
  ctx.lineWidth = 1;
  niceTicks(xr[0], xr[1], Math.max(2, Math.floor((w - m.l) / 80))).forEach((t) => {
    const x = X(t);
    ctx.beginPath(); ctx.moveTo(x, m.t); ctx.lineTo(x, h - m.b); ctx.stroke();
    const label = Math.abs(t) >= 1000 ? t.toFixed(0) : +t.toFixed(3) + "";
    ctx.fillText(label, x - ctx.measureText(label).width / 2, h - m.b + 13);
  });
  niceTicks(yr[0], yr[1], Math.max(2, Math.floor((h - m.t - m.b) / 40))).forEach((t) => {
    const y = Y(t);
    ctx.beginPath(); ctx.moveTo(m.l, y); ctx.lineTo(w - m.r, y); ctx.stroke();
    const label = +t.toFixed(3) + "";
    ctx.fillText(label, m.l - 4 - ctx.measureText(label).width, y + 4);
  });
  if (opts.xlabel) ctx.fillText(opts.xlabel, w - m.r - ctx.measureText(opts.xlabel).width, h - 3);
  if (opts.ylabel) {  // vertical, in the left margin, clear of the plot area
    ctx.save();
    ctx.translate(11, m.t + (h - m.t - m.b) / 2 + ctx.measureText(opts.ylabel).width / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.fillText(opts.ylabel, 0, 0);
    ctx.restore();
  }
  // vertical markers
  (opts.vlines || []).forEach((v) => {
    const x = X(v.x);
    if (x < m.l || x > w - m.r) return;
    ctx.strokeStyle = v.color;
    ctx.setLineDash([4, 3]);
    ctx.beginPath(); ctx.moveTo(x, m.t); ctx.lineTo(x, h - m.b); ctx.stroke();
    ctx.setLineDash([]);
    if (v.label) { ctx.fillStyle = v.color; ctx.fillText(v.label, x + 3, h - m.b - 4); }
  });
  // data
  ctx.save();
  ctx.beginPath();
  ctx.rect(m.l, m.t, w - m.l - m.r, h - m.t - m.b);
  ctx.clip();
  series.forEach((s) => {
    ctx.strokeStyle = ctx.fillStyle = s.color || COLORS.line;
    ctx.lineWidth = s.width || 1.5;
    if (s.dots) {
      for (let i = 0; i < s.x.length; i++) {
        if (s.y[i] === null || s.x[i] === null) continue;
        ctx.globalAlpha = s.alpha ? Math.max(0.15, s.alpha[i] || 0) : 1;
        ctx.beginPath();
        ctx.arc(X(s.x[i]), Y(s.y[i]), s.dots, 0, 2 * Math.PI);
        ctx.fill();
      }
      ctx.globalAlpha = 1;
      return;
    }
    if (s.dash) ctx.setLineDash(s.dash);
    ctx.beginPath();
    let pen = false;
    for (let i = 0; i < s.x.length; i++) {
      const yv = s.y[i];
      if (yv === null || s.x[i] === null) { pen = false; continue; }
      if (pen) ctx.lineTo(X(s.x[i]), Y(yv)); else ctx.moveTo(X(s.x[i]), Y(yv));
      pen = true;
    }
    ctx.stroke();
    ctx.setLineDash([]);
  });
  ctx.restore();
}
