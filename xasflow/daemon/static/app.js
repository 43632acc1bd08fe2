// xasflow dashboard: follows the daemon's server-sent events and draws the newest state.
// Hand-written canvas plots, no libraries, no external requests. The server sends at most
// a few states per second; here each state only replaces the previous one and drawing
// happens on the next animation frame, so a burst never queues up work in the browser.
"use strict";

(function () {
  const token = new URLSearchParams(window.location.search).get("token");
  const query = token ? "?token=" + encodeURIComponent(token) : "";
  const $ = (id) => document.getElementById(id);
  const COLORS = {
    line: "#5fb3f9", line2: "#f9a85f", grid: "#2b3442", axis: "#8b97a6", text: "#dbe2ea",
    e0: "#ef6b6b", window: "rgba(95,179,249,0.08)", region: [249, 168, 95], ok: "#5fd38d",
  };
  const TASK_COLORS = { cn: "#5fb3f9", environment: "#b48ef7", motifs: "#b48ef7",
    valence: "#5fd38d", distance: "#f9a85f", charge: "#f2c14e" };

  // what tests and curious operators can look at
  const app = (window.xasflow = { state: null, messages: 0, renders: 0, shading: "all" });
  let pending = false;
  let lastMessageAt = null;

  // ------------------------------------------------------------------ formatting

  function fmt(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (typeof v !== "number") return String(v);
    return v.toFixed(digits === undefined ? 2 : digits);
  }
  function pct(p) { return p === null || p === undefined ? "–" : (100 * p).toFixed(0) + " %"; }
  function short(uid) { return uid ? String(uid).slice(0, 8) : "–"; }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function rows(table, header, body) {
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
  function ago(seconds) {
    if (seconds < 1) return "just now";
    if (seconds < 90) return seconds.toFixed(0) + " s ago";
    return (seconds / 60).toFixed(0) + " min ago";
  }

  // ------------------------------------------------------------------ plotting

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
  function plot(canvas, opts) {
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

  // ------------------------------------------------------------------ panels

  function regionFill(importance) {
    const [r, g, b] = COLORS.region;
    return `rgba(${r},${g},${b},${(0.05 + 0.4 * Math.max(0, Math.min(1, importance))).toFixed(3)})`;
  }
  function regionImportance(region) {
    if (app.shading === "all") return region.max || 0;
    return (region.importance || {})[app.shading] || 0;
  }

  function renderTaskButtons(spec) {
    const box = $("task-buttons");
    const tasks = ["all"].concat(spec ? spec.tasks || [] : []);
    const have = Array.from(box.children).map((b) => b.dataset.task).join(",");
    if (have !== tasks.join(",")) {
      clear(box);
      tasks.forEach((t) => {
        const b = el("button", null, t);
        b.dataset.task = t;
        b.addEventListener("click", () => {
          app.shading = t;
          markShading(box);  // the pressed button shows at once, the plots on the next frame
          schedule();
        });
        box.appendChild(b);
      });
    }
    if (!tasks.includes(app.shading)) app.shading = "all";
    markShading(box);
  }
  function markShading(box) {
    Array.from(box.children).forEach((b) => b.classList.toggle("active", b.dataset.task === app.shading));
  }

  function renderSpectrum(spec) {
    renderTaskButtons(spec);
    const legend = $("region-legend");
    clear(legend);
    if (!spec) {
      plot($("raw-plot"), { empty: "waiting for a spectrum" });
      plot($("norm-plot"), { empty: "waiting for a spectrum" });
      return;
    }
    $("spectrum-info").textContent =
      `run ${short(spec.raw_uid)} · spectrum #${spec.index} · E₀ ${fmt(spec.e0, 1)} eV` +
      (spec.energy_shift !== null ? ` · foil shift ${fmt(spec.energy_shift, 2)} eV` : "") +
      ` · ${spec.bundle_id}`;
    const e0 = spec.e0, win = spec.window || [0, 0];
    const regions = spec.regions || [];
    plot($("raw-plot"), {
      series: [{ x: spec.energy, y: spec.mu, color: COLORS.line }],
      bands: [{ x0: e0 + win[0], x1: e0 + win[1], fill: COLORS.window, label: "model window" }]
        .concat(regions.map((r) => ({ x0: e0 + r.start, x1: e0 + r.stop, fill: regionFill(regionImportance(r) * 0.5) }))),
      vlines: [{ x: e0, color: COLORS.e0, label: "E₀" }],
      xlabel: "E (eV)", ylabel: "μ",
    });
    plot($("norm-plot"), {
      series: [{ x: spec.grid, y: spec.y, color: COLORS.line2, width: 2 }],
      bands: regions.map((r) => ({ x0: r.start, x1: r.stop, fill: regionFill(regionImportance(r)), label: r.name })),
      vlines: [{ x: 0, color: COLORS.e0, label: "E₀" }],
      xrange: [win[0], win[1]],
      xlabel: "E − E₀ (eV)", ylabel: "norm. μ",
    });
    regions.forEach((r) => {
      const item = el("span");
      const sw = el("span", "swatch");
      sw.style.background = regionFill(regionImportance(r));
      item.appendChild(sw);
      item.appendChild(document.createTextNode(`${r.name} ${fmt(regionImportance(r), 2)}`));
      legend.appendChild(item);
    });
  }

  function bars(box, probabilities, top) {
    clear(box);
    if (!probabilities) return;
    Object.entries(probabilities).forEach(([label, p]) => {
      const row = el("div", "bar" + (String(label) === String(top) ? " top" : ""));
      row.appendChild(el("span", null, label));
      const track = el("span", "track");
      const fill = el("span", "fill");
      fill.style.width = (100 * Math.max(0, Math.min(1, p))).toFixed(1) + "%";
      fill.style.display = "block";
      track.appendChild(fill);
      row.appendChild(track);
      row.appendChild(el("span", "num", pct(p)));
      box.appendChild(row);
    });
  }

  function setList(values) {
    return values && values.length ? "{" + values.join(", ") + "}" : "";
  }

  // the run's last row when it is the shown prediction's own spectrum (else null: a newer
  // run, or a rejected spectrum since, must not lend it flags or a latency)
  function ownRow(state) {
    const pred = state.prediction, run = state.run, last = run && run.last;
    if (!pred || !last) return pred ? null : last;
    return run.raw_uid === pred.raw_uid && last.index === pred.index ? last : null;
  }

  // the flags of the prediction and of its own row (a comma-separated data key)
  function flagsOf(pred, last) {
    return ((pred && pred.flags) || []).concat(
      last && last.flags ? String(last.flags).split(",").filter(Boolean) : []);
  }

  // the conformal coverage a bundle's sets and intervals were fitted for (90 % before it said)
  const level = (t) => `${Math.round(100 * ((t && t.coverage) ?? 0.9))} %`;

  function renderDoubt(pred, last) {
    // out of the bundle's domain: say so over the answer, so no one takes it for one
    const ood = pred ? !!pred.out_of_domain : !!(last && last.out_of_domain);
    const score = pred ? pred.ood_score : last && last.ood_score;
    const banner = $("ood-banner");
    // the daemon's hint: in domain if the spectrum were declared HERFD (daemon/herfd_hint.py)
    const herfd = flagsOf(pred, last).includes("herfd_suspected");
    banner.hidden = !ood;
    banner.textContent = ood
      ? "OUT OF DOMAIN: this spectrum is unlike the model's training data; the answer below is not to be trusted" +
        (score !== null && score !== undefined ? ` (score ${fmt(score, 2)})` : "") +
        (herfd ? ". It looks like HERFD: if it was measured so, declare it (analysis.herfd)" : "")
      : "";
    $("prediction-card").classList.toggle("ood", ood);
    const cn = pred && pred.tasks && pred.tasks.cn;
    const set = cn && cn.prediction_set ? setList(cn.prediction_set.map((v) => fmt(v, 0)))
      : last && last.cn_set ? "{" + String(last.cn_set).split(",").join(", ") + "}" : "";
    $("cn-set").textContent = set ? `${level(cn)} set ${set}` : "";
  }

  // the answer shown is an earlier run's while the current run has none yet (say, every
  // spectrum of it rejected): say so over it, so no one reads it as the current sample's
  function renderStale(state) {
    const pred = state.prediction, run = state.run, rej = state.last_rejection;
    const stale = !!(pred && run && run.raw_uid !== pred.raw_uid && !run.n_ok);
    const note = $("pred-stale");
    note.hidden = !stale;
    note.textContent = !stale ? "" :
      `from an earlier run (${short(pred.raw_uid)}): run ${short(run.raw_uid)} has no answer yet` +
      (run.n_rejected ? `, ${run.n_rejected} rejected` +
        (rej && rej.raw_uid === run.raw_uid ? ` (last: ${rej.reason})` : "") : "");
    $("prediction-card").classList.toggle("stale", stale);
  }

  function renderPrediction(state) {
    const pred = state.prediction;
    const last = ownRow(state);
    const rej = state.last_rejection;
    renderDoubt(pred, last);
    renderStale(state);
    $("last-rejection").textContent = rej
      ? `last rejection: run ${short(rej.raw_uid)} #${rej.index}: ${rej.reason}${rej.detail ? " — " + rej.detail : ""}`
      : "";
    if (!pred) {
      // no spectrum arrays (e.g. an older pipeline): fall back on the published event
      if (last && last.status === "ok") {
        $("cn-value").textContent = fmt(last.cn, 0);
        $("cn-p").textContent = "p " + pct(last.cn_probability);
        $("environment").textContent = last.motif || "–";
      }
      return;
    }
    const t = pred.tasks || {};
    $("pred-where").textContent = `run ${short(pred.raw_uid)} · #${pred.index}`;
    const cn = t.cn;
    $("cn-value").textContent = cn ? String(cn.value) : "–";
    $("cn-p").textContent = cn && cn.confidence !== undefined ? "p " + pct(cn.confidence) +
      (cn.metrics && cn.metrics.accuracy !== undefined ? ` · held-out acc. ${pct(cn.metrics.accuracy)}` : "") : "";
    bars($("cn-bars"), cn && cn.probabilities, cn && cn.value);
    $("environment").textContent = pred.environment || "–";
    // every classifier's conformal set beside its answer, as the CN's (renderDoubt)
    const env = t.environment;
    $("environment-set").textContent = env && env.prediction_set
      ? `${level(env)} set ${setList(env.prediction_set)}` : "";
    const motifs = $("motifs");
    clear(motifs);
    const ranked = pred.motifs || [];
    // the head is the motif of the CN answered (make_consistent), even one scored low
    const led = ranked.length > 1 && ranked[0][1] < Math.max(...ranked.map((r) => r[1]));
    ranked.forEach(([label, score], i) => {
      const li = el("li", null, label);
      li.appendChild(el("span", "score", fmt(score, 2)));
      if (i === 0 && led && cn) li.appendChild(el("span", "note", ` motif of CN ${cn.value}`));
      motifs.appendChild(li);
    });
    const val = t.valence;
    $("valence-value").textContent = val ? (val.value > 0 ? "+" : "") + val.value : "–";
    $("valence-p").textContent = val && val.confidence !== undefined ? "p " + pct(val.confidence) : "";
    const signed = (v) => (v > 0 ? "+" : "") + v;
    $("valence-set").textContent = val && val.prediction_set
      ? `${level(val)} set ${setList(val.prediction_set.map(signed))}` : "";
    bars($("valence-bars"), val && val.probabilities, val && val.value);
    const dist = t.distance, charge = t.charge;
    const interval = (t, digits) => !t ? "" : t.interval
      ? ` (${level(t)}: ${fmt(t.interval[0], digits)}–${fmt(t.interval[1], digits)})`
      : t.interval_unbounded ? ` (${level(t)}: unbounded)` : "";
    $("distance-value").textContent = dist
      ? `${fmt(dist.value, 3)} ± ${fmt(dist.uncertainty, 3)} Å${interval(dist, 3)}` : "–";
    $("charge-value").textContent = charge
      ? `${fmt(charge.value, 2)} ± ${fmt(charge.uncertainty, 2)} e${interval(charge, 2)}` : "–";
    $("e0-value").textContent = `${fmt(pred.e0, 1)} eV`;
    const flags = flagsOf(pred, last);
    const notes = [];
    if (flags.length) notes.push("flags: " + Array.from(new Set(flags)).join(", "));
    if (last && last.latency_ms !== null && last.latency_ms !== undefined) {
      notes.push(`latency ${fmt(last.latency_ms, 1)} ms`);
    }
    $("pred-flags").textContent = notes.join("  ·  ");
  }

  function renderRun(state) {
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
    plot($("hist-cn"), {
      series: [
        { x: x, y: h.cn, dots: 3, color: COLORS.line, alpha: h.cn_probability },
      ],
      xlabel: "spectrum #", ylabel: "CN", empty: "no spectra yet",
      xrange: x.length === 1 ? [x[0] - 1, x[0] + 1] : undefined,
    });
    const distSeries = [{ x: x, y: h.distance, color: COLORS.line2, width: 2, dots: x.length < 3 ? 3 : 0 }];
    if (mae && h.distance) {
      distSeries.push({ x: x, y: h.distance.map((d) => (d === null ? null : d + mae)), color: "#6b5640", width: 1, dash: [3, 3] });
      distSeries.push({ x: x, y: h.distance.map((d) => (d === null ? null : d - mae)), color: "#6b5640", width: 1, dash: [3, 3] });
    }
    plot($("hist-distance"), {
      series: distSeries, xlabel: "spectrum #", ylabel: "Å", empty: "no spectra yet",
      xrange: x.length === 1 ? [x[0] - 1, x[0] + 1] : undefined,
    });
    plot($("hist-charge"), {
      series: [
        { x: x, y: h.charge, color: "#f2c14e", width: 2, dots: x.length < 3 ? 3 : 0 },
        { x: x, y: h.valence, color: COLORS.ok, width: 1, dash: [4, 3], dots: x.length < 3 ? 2 : 0 },
      ],
      xlabel: "spectrum #", ylabel: "e", empty: "no spectra yet",
      xrange: x.length === 1 ? [x[0] - 1, x[0] + 1] : undefined,
    });
  }

  function renderRecommendation(state) {
    const rec = state.run && state.run.recommendation;
    if (!rec) {
      $("rec-info").textContent = "none yet (recommendations off or no spectrum)";
      clear($("rec-table"));
      return;
    }
    $("rec-info").textContent = `after #${rec.index} · ${rec.n_points} points, ${fmt(rec.scan_time, 0)} s` +
      (rec.stop_early ? ` · STOP EARLY: ${rec.stop_reason}` : "") +
      (rec.rescan ? ` · rescan ${rec.rescan.name || ""}` : "");
    rows($("rec-table"), ["region", "from (eV)", "to (eV)", "step", "dwell (s)", "why"],
      (rec.regions || []).map((r) => [r.name || "", r.start, r.stop, r.step, r.dwell, r.reason || ""]));
  }

  function renderHealth(state) {
    const h = state.health, r = state.rates || {};
    const ready = $("ready");
    if (h) {
      ready.textContent = h.ready ? "daemon ready" : "daemon not ready";
      ready.className = "pill " + (h.ready ? "ok" : "bad");
    }
    // "rejected/s" beside "spectra/s" is the spectra the analysis rejected; what the
    // assembler refused (documents, runs: no spectra) is shown apart, when there is any
    const perS = (v, digits) => (v === null || v === undefined ? "–" : fmt(v, digits));
    $("rates").textContent = r.analysed_per_s !== null && r.analysed_per_s !== undefined
      ? `${fmt(r.analysed_per_s, 1)} spectra/s · ${fmt(r.analysis_rejected_per_s, 1)} rejected/s` +
        (r.assembly_rejected_per_s > 0
          ? ` · ${fmt(r.assembly_rejected_per_s, 1)} rejected in assembly/s` : "")
      : "";
    if (!h) return;
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

  function renderRuns(state) {
    rows($("runs-table"), ["run", "kind", "sample", "ok", "rej.", "OOD", "status"],
      (state.runs || []).map((r) => [short(r.raw_uid), r.kind, r.sample || "", r.n_ok, r.n_rejected,
        r.n_out_of_domain || 0,
        (r.exit_status || "running") + (r.missing ? ` (${r.missing} lost)` : "")]));
  }

  function render() {
    pending = false;
    const state = app.state;
    if (!state) return;
    app.renders += 1;
    renderSpectrum(state.spectrum);
    renderPrediction(state);
    renderRun(state);
    renderRecommendation(state);
    renderHealth(state);
    renderRuns(state);
    document.body.dataset.version = String(state.version);
  }

  function schedule() {
    if (pending) return;
    pending = true;
    if (document.hidden) setTimeout(render, 250); // animation frames pause in hidden tabs
    else window.requestAnimationFrame(render);
  }

  // ------------------------------------------------------------------ connection

  function setConn(text, cls) {
    const c = $("conn");
    c.textContent = text;
    c.className = "pill " + cls;
  }

  function connect() {
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
      schedule();
    });
    app.source = source;
  }

  setInterval(() => {
    if (lastMessageAt !== null) $("age").textContent = "updated " + ago((Date.now() - lastMessageAt) / 1000);
  }, 1000);
  window.addEventListener("resize", schedule);
  connect();
})();
