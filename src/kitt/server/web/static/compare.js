/* The comparison's charts. Every number comes computed from the server (the JSON block
 * "compare-data"); this only draws it, with kitt.chart (which also writes each chart's
 * numbers into a table under it). */
(function () {
  "use strict";

  function series(labels, values) {
    return labels.map(function (label, i) { return { label: label, values: values[i] }; });
  }

  function draw(id, spec) {
    const box = document.getElementById(id);
    return box ? kitt.chart(box, spec) : null;
  }

  document.addEventListener("DOMContentLoaded", function () {
    const data = kitt.data("compare-data");
    if (!data) return;
    const labels = data.labels;
    data.curves.forEach(function (curve) {
      // Concurrency and rate levels usually grow geometrically (1, 4, 16, 64).
      const xLog = curve.x.length > 2 && curve.x.every(function (v) { return v > 0; });
      draw("chart-throughput-" + curve.mode, {
        title: curve.throughput.title, x: curve.x, xLabel: curve.x_label, xLog: xLog,
        yLabel: "output tok/s", series: series(labels, curve.throughput.values), digits: 1,
      });
      if (curve.energy) {
        draw("chart-energy-" + curve.mode, {
          title: curve.energy.title, x: curve.x, xLabel: curve.x_label, xLog: xLog,
          yLabel: "tokens/J", series: series(labels, curve.energy.values), digits: 3,
        });
      }
    });

    const latency = data.latency;
    const scopes = {};
    latency.scopes.forEach(function (s) { scopes[s.key] = s; });
    const first = latency.scopes[0];
    const common = { x: latency.x, xValues: latency.percentiles, xLabel: "percentile", yLabel: "ms", digits: 1 };
    const ttft = draw("chart-ttft", Object.assign({ title: "TTFT percentiles (ms)", series: series(labels, first.ttft) }, common));
    const tpot = draw("chart-tpot", Object.assign({ title: "TPOT percentiles (ms)", series: series(labels, first.tpot) }, common));
    const select = document.getElementById("latency-step");
    if (select) {
      select.addEventListener("change", function () {
        const scope = scopes[select.value];
        if (!scope) return;
        if (ttft) ttft.update(latency.x, series(labels, scope.ttft));
        if (tpot) tpot.update(latency.x, series(labels, scope.tpot));
      });
    }
  });
})();
