/* Charts for the dashboard, on uPlot. Every chart also writes its numbers into a table
 * (in a <details> under it): screen readers and keyboard users get the data, and the
 * browser tests read exactly what was drawn.
 *
 * kitt.chart(container, {
 *   title: "GPU utilisation", x: [...], xLabel: "time", time: true|false,
 *   yLabel: "%", series: [{label: "GPU 0", values: [...]}, ...], height: 220,
 *   digits: 1,          // decimals in the table
 *   xValues: [...],     // optional labels for the table's first column (e.g. step names)
 *   xLog: true,         // a log2 x axis: concurrency 1, 4, 16, 64 spaced evenly
 * }) -> {plot, update(x, series), destroy()}
 */
(function () {
  "use strict";
  const PALETTE = ["#1f5fbf", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0e7490", "#a16207", "#4d4d4d"];

  function table(spec) {
    const details = document.createElement("details");
    details.className = "chart-data";
    const summary = document.createElement("summary");
    summary.textContent = "Data: " + spec.title;
    details.appendChild(summary);
    const t = document.createElement("table");
    t.className = "data";
    const head = t.createTHead().insertRow();
    [spec.xLabel || "x"].concat(spec.series.map(function (s) { return s.label; })).forEach(function (h) {
      const th = document.createElement("th");
      th.scope = "col";
      th.textContent = h;
      head.appendChild(th);
    });
    const body = t.createTBody();
    spec.x.forEach(function (xv, i) {
      const row = body.insertRow();
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = spec.xValues ? spec.xValues[i]
        : spec.time ? new Date(xv * 1000).toLocaleString() : String(xv);
      row.appendChild(th);
      spec.series.forEach(function (s) {
        const v = s.values[i];
        row.insertCell().textContent = v === null || v === undefined ? "–" : kitt.fmt.num(v, spec.digits);
      });
    });
    details.appendChild(t);
    return details;
  }

  function chart(container, spec) {
    // Drawing again into the same box (a new period, a new result) replaces the chart:
    // the old plot and its resize listener go with it.
    if (container.kittChart) container.kittChart.destroy();
    container.textContent = "";
    container.classList.add("chart");
    const figure = document.createElement("figure");
    const caption = document.createElement("figcaption");
    caption.textContent = spec.title;
    figure.appendChild(caption);
    const canvasBox = document.createElement("div");
    canvasBox.setAttribute("role", "img");
    canvasBox.setAttribute("aria-label", spec.title + " (chart; the data table follows)");
    figure.appendChild(canvasBox);
    container.appendChild(figure);
    const width = Math.max(280, container.clientWidth || 600);
    const opts = {
      width: width,
      height: spec.height || 220,
      scales: { x: spec.xLog ? { time: false, distr: 3, log: 2 } : { time: !!spec.time } },
      axes: [
        { label: spec.time ? "" : (spec.xLabel || ""), stroke: "#333" },
        { label: spec.yLabel || "", stroke: "#333" },
      ],
      series: [{ label: spec.xLabel || "x" }].concat(spec.series.map(function (s, i) {
        return {
          label: s.label,
          stroke: s.color || PALETTE[i % PALETTE.length],
          width: 2,
          points: { show: !spec.time },
          spanGaps: false,
        };
      })),
      legend: { live: true },
    };
    const dataOf = function (x, series) { return [x].concat(series.map(function (s) { return s.values; })); };
    const plot = new uPlot(opts, dataOf(spec.x, spec.series), canvasBox);
    let tableEl = table(spec);
    container.appendChild(tableEl);
    const resize = function () {
      plot.setSize({ width: Math.max(280, container.clientWidth || width), height: opts.height });
    };
    window.addEventListener("resize", resize);
    const handle = {
      plot: plot,
      destroy: function () {
        window.removeEventListener("resize", resize);
        plot.destroy();
        container.kittChart = null;
      },
      update: function (x, series) {
        spec = Object.assign({}, spec, { x: x, series: series });
        plot.setData(dataOf(x, series));
        const fresh = table(spec);
        fresh.open = tableEl.open;
        container.replaceChild(fresh, tableEl);
        tableEl = fresh;
      },
    };
    container.kittChart = handle;
    return handle;
  }

  window.kitt = window.kitt || {};
  window.kitt.chart = chart;
})();
