// The current run (its predictions over time), its latest recommendation, and the table of
// recent runs.

import { $, clear, fmt, rows, short } from "./format.js{{query}}";
import { COLORS, plot } from "./plot.js{{query}}";

export function renderRun(state) {
  const run = state.run;
  if (!run) {
    $("history-note").textContent = "no run yet";
    ["hist-cn", "hist-distance", "hist-charge"].forEach((id) => plot($(id), { empty: "no run yet" }));
    return;
  }
  $("run-uid").textContent = short(run.raw_uid);
  $("run-uid").title = run.raw_uid;
  const lost = run.missing ? ` · ${run.missing} raw events lost` : "";
  const ood = run.n_out_of_domain ? ` · ${run.n_out_of_domain} out of domain` : "";
  const status = (run.exit_status ? `finished (${run.exit_status}${run.reason ? ": " + run.reason : ""})` : "running") + lost + ood;
  $("run-info").textContent = `${run.kind} scan${run.sample ? " of " + run.sample : ""} · ` +
    `${run.n_ok} analysed, ${run.n_rejected} rejected · ${status}`;
  const h = run.history || {};
  const x = h.index || [];
  $("history-note").textContent = x.length > 1
    ? (h.binned ? `${h.n} points averaged into ${x.length} bins` : "")
    : (run.kind === "step" ? "step scan: one spectrum per run (history shows quick-XAS runs)" : "");
  const dist = state.prediction && state.prediction.tasks && state.prediction.tasks.distance;
  const mae = dist && dist.uncertainty;
  // answers out of the bundle's domain (a bin mostly out of it) drawn apart, in the alarm
  // colour, so a guess never reads as a trusted CN, distance or charge
  const out = (i) => (h.out_of_domain || [])[i] >= 0.5;
  const cn = h.cn || [];
  const outDots = (y) => ({ x: x, y: x.map((_, i) => (out(i) && y && y[i] !== undefined ? y[i] : null)), dots: 3, color: COLORS.e0 });
  plot($("hist-cn"), {
    series: [
      { x: x, y: cn.map((v, i) => (out(i) ? null : v)), dots: 3, color: COLORS.line, alpha: h.cn_probability },
      outDots(cn),
    ],
    xlabel: "spectrum #", ylabel: "CN", empty: "no spectra yet",
    xrange: x.length === 1 ? [x[0] - 1, x[0] + 1] : undefined,
  });
  const distSeries = [{ x: x, y: h.distance, color: COLORS.line2, width: 2, dots: x.length < 3 ? 3 : 0 }];
  if (mae && h.distance) {
    distSeries.push({ x: x, y: h.distance.map((d) => (d === null ? null : d + mae)), color: "#6b5640", width: 1, dash: [3, 3] });
    distSeries.push({ x: x, y: h.distance.map((d) => (d === null ? null : d - mae)), color: "#6b5640", width: 1, dash: [3, 3] });
  }
  distSeries.push(outDots(h.distance));
  plot($("hist-distance"), {
    series: distSeries, xlabel: "spectrum #", ylabel: "Å", empty: "no spectra yet",
    xrange: x.length === 1 ? [x[0] - 1, x[0] + 1] : undefined,
  });
  plot($("hist-charge"), {
    series: [
      { x: x, y: h.charge, color: "#f2c14e", width: 2, dots: x.length < 3 ? 3 : 0 },
      { x: x, y: h.valence, color: COLORS.ok, width: 1, dash: [4, 3], dots: x.length < 3 ? 2 : 0 },
      outDots(h.charge),
    ],
    xlabel: "spectrum #", ylabel: "e", empty: "no spectra yet",
    xrange: x.length === 1 ? [x[0] - 1, x[0] + 1] : undefined,
  });
}

export function renderRecommendation(state) {
  const rec = state.run && state.run.recommendation;
  if (!rec) {
    $("rec-info").textContent = "none yet (recommendations off or no spectrum)";
    clear($("rec-table"));
    return;
  }
  // a stop reason without stop_early says why stopping was withheld (seq_gap, align_failed, ...)
  const stop = rec.stop_early ? ` · STOP EARLY: ${rec.stop_reason}`
    : rec.stop_reason ? ` · not stopping: ${rec.stop_reason}` : "";
  $("rec-info").textContent = `after #${rec.index} · ${rec.n_points} points, ${fmt(rec.scan_time, 0)} s` +
    stop + (rec.rescan ? ` · rescan ${rec.rescan.name || ""}` : "");
  const row = (r, name) => [name, r.start, r.stop, r.step, r.dwell, r.reason || ""];
  rows($("rec-table"), ["region", "from (eV)", "to (eV)", "step", "dwell (s)", "why"],
    (rec.regions || []).map((r) => row(r, r.name || ""))
      .concat((rec.dropped || []).map((r) => row(r, `${r.name || ""} (not measured)`))));
}

export function renderRuns(state) {
  rows($("runs-table"), ["run", "kind", "sample", "ok", "rej.", "OOD", "status"],
    (state.runs || []).map((r) => [short(r.raw_uid), r.kind, r.sample || "", r.n_ok, r.n_rejected,
      r.n_out_of_domain || 0,
      (r.exit_status || "running") + (r.missing ? ` (${r.missing} lost)` : "")]));
}
