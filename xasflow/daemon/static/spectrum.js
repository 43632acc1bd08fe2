// The latest spectrum's card: raw mu(E) and normalised mu on the model grid, the bundle's
// energy regions shaded by how much the chosen task (buttons) depends on them.

import { $, clear, el, fmt, short } from "./format.js{{query}}";
import { COLORS, plot } from "./plot.js{{query}}";

function regionFill(importance) {
  const [r, g, b] = COLORS.region;
  return `rgba(${r},${g},${b},${(0.05 + 0.4 * Math.max(0, Math.min(1, importance))).toFixed(3)})`;
}
function regionImportance(region, app) {
  if (app.shading === "all") return region.max || 0;
  return (region.importance || {})[app.shading] || 0;
}

function renderTaskButtons(spec, app, redraw) {
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
        markShading(box, app);  // the pressed button shows at once, the plots on the next frame
        redraw();
      });
      box.appendChild(b);
    });
  }
  if (!tasks.includes(app.shading)) app.shading = "all";
  markShading(box, app);
}
function markShading(box, app) {
  Array.from(box.children).forEach((b) => b.classList.toggle("active", b.dataset.task === app.shading));
}

// app: the page's state object (its `shading`); redraw: asks for the next frame
export function renderSpectrum(spec, app, redraw) {
  renderTaskButtons(spec, app, redraw);
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
      .concat(regions.map((r) => ({ x0: e0 + r.start, x1: e0 + r.stop, fill: regionFill(regionImportance(r, app) * 0.5) }))),
    vlines: [{ x: e0, color: COLORS.e0, label: "E₀" }],
    xlabel: "E (eV)", ylabel: "μ",
  });
  plot($("norm-plot"), {
    series: [{ x: spec.grid, y: spec.y, color: COLORS.line2, width: 2 }],
    bands: regions.map((r) => ({ x0: r.start, x1: r.stop, fill: regionFill(regionImportance(r, app)), label: r.name })),
    vlines: [{ x: 0, color: COLORS.e0, label: "E₀" }],
    xrange: [win[0], win[1]],
    xlabel: "E − E₀ (eV)", ylabel: "norm. μ",
  });
  regions.forEach((r) => {
    const item = el("span");
    const sw = el("span", "swatch");
    sw.style.background = regionFill(regionImportance(r, app));
    item.appendChild(sw);
    item.appendChild(document.createTextNode(`${r.name} ${fmt(regionImportance(r, app), 2)}`));
    legend.appendChild(item);
  });
}
