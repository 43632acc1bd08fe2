// The prediction card: CN, environment, motifs, valence, distance, charge, with their doubt
// (probabilities, conformal sets and intervals), the OUT OF DOMAIN banner over an answer not
// to be trusted, and the note over an answer that is an earlier run's.

import { $, clear, el, fmt, pct, short } from "./format.js{{query}}";

// one bar per class; label: how a class is written (the valence's signed, as its value)
function bars(box, probabilities, top, label = String) {
  clear(box);
  if (!probabilities) return;
  Object.entries(probabilities).forEach(([cls, p]) => {
    const row = el("div", "bar" + (String(cls) === String(top) ? " top" : ""));
    row.appendChild(el("span", null, label(cls)));
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

// the coverage a task's sets and intervals hold as served (Manifest.set_coverage; 90 % before it said)
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
// spectrum of it rejected): say so over it, so no one reads it as the current sample's;
// once that run has ended, no answer is to come from it, and the note says so
function renderStale(state) {
  const pred = state.prediction, run = state.run, rej = state.last_rejection;
  const stale = !!(pred && run && run.raw_uid !== pred.raw_uid && !run.n_ok);
  const note = $("pred-stale");
  note.hidden = !stale;
  note.textContent = !stale ? "" :
    `from an earlier run (${short(pred.raw_uid)}): run ${short(run.raw_uid)} ` +
    (run.exit_status ? "ended with no answer" : "has no answer yet") +
    (run.n_rejected ? `, ${run.n_rejected} rejected` +
      (rej && rej.raw_uid === run.raw_uid ? ` (last: ${rej.reason})` : "") : "");
  $("prediction-card").classList.toggle("stale", stale);
}

// the fields only a prediction fills, blank as the page starts (the OOD banner, the CN's set
// and the stale note are renderDoubt's and renderStale's, the last rejection the caller's)
const TEXTS = ["pred-where", "cn-value", "cn-p", "environment", "environment-set",
  "valence-value", "valence-p", "valence-set", "distance-value", "charge-value", "e0-value",
  "pred-flags"];
const BOXES = ["cn-bars", "motifs", "valence-bars"];

function clearCard() {
  TEXTS.forEach((id) => { $(id).textContent = ""; });
  BOXES.forEach((id) => clear($(id)));
}

export function renderPrediction(state) {
  const pred = state.prediction;
  const last = ownRow(state);
  const rej = state.last_rejection;
  renderDoubt(pred, last);
  renderStale(state);
  $("last-rejection").textContent = rej
    ? `last rejection: run ${short(rej.raw_uid)} #${rej.index}: ${rej.reason}${rej.detail ? " — " + rej.detail : ""}`
    : "";
  if (!pred) {
    // no prediction (an older pipeline's state, a restarted daemon's before its first
    // answer): nothing of an earlier one stays, only what the published event says
    clearCard();
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
  // the head is the environment answer, the CN answer's (make_consistent), even one its
  // order parameter puts low: the note says why it leads the higher ones below it
  const led = ranked.length > 1 && ranked[0][1] < Math.max(...ranked.map((r) => r[1]));
  ranked.forEach(([label, score], i) => {
    const li = el("li", null, label);
    li.appendChild(el("span", "score", fmt(score, 2)));
    if (i === 0 && led && cn) {
      li.appendChild(el("span", "note", ` the environment answer, chosen for CN ${cn.value}`));
    }
    motifs.appendChild(li);
  });
  const val = t.valence;
  const signed = (v) => (Number(v) > 0 ? "+" : "") + v;  // a class key is a string: "2"
  $("valence-value").textContent = val ? signed(val.value) : "–";
  $("valence-p").textContent = val && val.confidence !== undefined ? "p " + pct(val.confidence) : "";
  $("valence-set").textContent = val && val.prediction_set
    ? `${level(val)} set ${setList(val.prediction_set.map(signed))}` : "";
  bars($("valence-bars"), val && val.probabilities, val && val.value, signed);
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
