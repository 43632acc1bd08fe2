// The daemon's health: the ready pill, the rates, the counts table, the rejections by stage
// and reason, and the models in service with their held-out metrics.

import { $, clear, fmt, rows } from "./format.js{{query}}";

export function renderHealth(state) {
  const h = state.health, r = state.rates || {};
  const ready = $("ready");
  // no report (the daemon's health() failed): the last one's "ready" and numbers would pass
  // for current ones, so none are shown
  // ready but serving no bundle: every spectrum is rejected no_model, so not a green "ready"
  const idle = h && h.ready && h.serving === false;
  ready.textContent = !h ? "daemon health unknown" : idle ? "daemon ready · no model"
    : h.ready ? "daemon ready" : "daemon not ready";
  ready.className = "pill " + (!h || idle ? "warn" : h.ready ? "ok" : "bad");
  // "rejected/s" beside "spectra/s" is the spectra the analysis rejected; what the
  // assembler refused (documents, runs: no spectra) is shown apart, when there is any
  const perS = (v, digits) => (v === null || v === undefined ? "–" : fmt(v, digits));
  $("rates").textContent = r.analysed_per_s !== null && r.analysed_per_s !== undefined
    ? `${fmt(r.analysed_per_s, 1)} spectra/s · ${fmt(r.analysis_rejected_per_s, 1)} rejected/s` +
      (r.assembly_rejected_per_s > 0
        ? ` · ${fmt(r.assembly_rejected_per_s, 1)} rejected in assembly/s` : "")
    : "";
  if (!h) {
    $("health-info").textContent = "no health report (see the daemon's log)";
    ["health-table", "reject-table", "models-table"].forEach((id) => clear($(id)));
    return;
  }
  const lat = h.latency || {};
  $("health-info").textContent = `xasflow ${h.version} · up ${fmt(h.uptime_s / 60, 1)} min`;
  const d = state.dashboard || {};
  rows($("health-table"), null, [
    // received = analysed + rejected by the analysis; the assembler refuses documents
    // and runs before that (rejected_total, the sum of both, is no count of spectra)
    ["spectra analysed", h.analysed],
    ["spectra rejected by the analysis", (h.rejected_per_stage || {}).analysis ?? "–"],
    ["rejected before the analysis (assembly)", (h.rejected_per_stage || {}).assembly ?? "–"],
    ["analysed / s", perS(r.analysed_per_s, 1)],
    ["rejected by the analysis / s", perS(r.analysis_rejected_per_s, 1)],
    ["rejected in assembly / s", perS(r.assembly_rejected_per_s, 1)],
    ["documents in / s", perS(r.documents_per_s, 0)],
    ["queue depth", h.queue_depth], ["open runs", h.open_runs],
    ["latency p50 / p99", `${fmt(lat.p50_ms, 1)} / ${fmt(lat.p99_ms, 1)} ms`],
    ["input dropped (overflow)", (h.input || {}).dropped_overflow || 0],
    ["raw events lost", Object.entries(h.events_lost || {}).map(([c, n]) => `${c} ${n}`).join(", ") || 0],
    ["out of domain (not trusted)", h.out_of_domain || 0],
    ["decode errors", Object.values(h.decode_errors || {}).reduce((a, b) => a + b, 0)],
    ["store rows / queued", `${(h.store || {}).stored ?? "–"} / ${(h.store || {}).queued ?? "–"}`],
    ["internal errors", h.internal_errors || 0],
    ["dashboard updates dropped", d.dropped || 0],
  ]);
  const stages = h.rejected_by_stage || {};
  const body = [];
  Object.entries(stages).forEach(([stage, reasons]) =>
    Object.entries(reasons).forEach(([reason, n]) => body.push([reason, stage, n])));
  body.sort((a, b) => b[2] - a[2]);
  rows($("reject-table"), ["reason", "stage", "count"], body.length ? body : [["none", "", ""]]);
  const mrows = [];
  (h.models || []).forEach((m) => {
    Object.entries(m.metrics || {}).forEach(([task, met], i) => {
      const keys = ["accuracy", "top1_accuracy", "mae", "r2", "jaccard", "ece", "set_coverage",
        "interval_coverage"].filter((k) => met[k] !== undefined);
      mrows.push([i === 0 ? `${m.element} ${m.edge} · ${m.bundle_id}` : "", task,
        keys.map((k) => `${k} ${fmt(met[k], 3)}`).join(", ")]);
    });
  });
  Object.entries(h.models_refused || {}).forEach(([dir, why]) => mrows.push([dir, "REFUSED", why]));
  rows($("models-table"), ["bundle", "task", "held-out metrics"], mrows.length ? mrows : [["none", "", ""]]);
}
