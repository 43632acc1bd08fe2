// xasflow dashboard: follows the daemon's server-sent events and draws the newest state.
// Hand-written canvas plots, no libraries, no external requests. The server sends at most
// a few states per second; here each state only replaces the previous one and drawing
// happens on the next animation frame, so a burst never queues up work in the browser.
// The entry module (ES modules, no build step); each panel is drawn by a module of its own.
// The imports end in a placeholder that the daemon fills in with the page's ?token=
// (dashboard_routes), so the modules load where an access token is required.

import { renderHealth } from "./health.js{{query}}";
import { renderPrediction } from "./prediction.js{{query}}";
import { renderRecommendation, renderRun, renderRuns } from "./run.js{{query}}";
import { renderSpectrum } from "./spectrum.js{{query}}";
import { connect } from "./stream.js{{query}}";

// what tests and curious operators can look at
const app = (window.xasflow = { state: null, messages: 0, renders: 0, shading: "all" });
let pending = false;

function render() {
  pending = false;
  const state = app.state;
  if (!state) return;
  app.renders += 1;
  renderSpectrum(state.spectrum, app, schedule);
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

window.addEventListener("resize", schedule);
connect(app, schedule);
