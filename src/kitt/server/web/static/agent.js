/* One agent's page: heartbeat history charts, live facts, and the remove/revoke actions.
 *
 * History comes from GET /api/v1/agents/<id>/heartbeats (the last hour or day); after
 * that, each `agent` event of the fleet stream whose last_seen_at moved fetches only the
 * heartbeats after the newest one shown (no polling). Long periods are averaged down to
 * at most MAX_POINTS points per chart. Every request names the agent by its id, never
 * its name: a page left open must not revoke or remove a newer agent that took the name.
 */
(function () {
  "use strict";
  const RANGES = { hour: 3600, day: 86400 };
  const MAX_POINTS = 720;
  const LIMIT = 10000; // the API's cap per request
  const METRICS = [
    { id: "chart-util", title: "GPU utilisation", yLabel: "%", field: "utilization_pct" },
    { id: "chart-memory", title: "GPU memory used", yLabel: "GB", field: "memory_used_gb" },
    { id: "chart-temperature", title: "GPU temperature", yLabel: "°C", field: "temperature_c" },
    { id: "chart-power", title: "GPU power", yLabel: "W", field: "power_w" },
  ];

  function mean(values) {
    const known = values.filter(function (v) { return v !== null && v !== undefined; });
    return known.length ? known.reduce(function (a, b) { return a + b; }, 0) / known.length : null;
  }

  /* Buckets of `size` consecutive values, each its mean (nulls left out). */
  function buckets(values, size, merge) {
    if (size <= 1) return values;
    const out = [];
    for (let i = 0; i < values.length; i += size) out.push(merge(values.slice(i, i + size)));
    return out;
  }

  function agentPage(info) {
    const byId = "/api/v1/agents/" + encodeURIComponent(info.id);
    const fmt = kitt.fleetFmt;
    const el = function (id) { return document.getElementById(id); };
    let range = "hour";
    let records = []; // oldest first
    let truncated = false;
    const charts = {};
    let busy = false;
    let again = false;
    let generation = 0; // a range change makes answers to older requests stale
    let lastSeen;
    let gone = false;

    function render() {
      const cutoff = Date.now() / 1000 - RANGES[range];
      records = records.filter(function (r) { return Date.parse(r.ts) / 1000 >= cutoff; });
      const size = Math.ceil(records.length / MAX_POINTS);
      const times = records.map(function (r) { return Date.parse(r.ts) / 1000; });
      const x = buckets(times, size, function (chunk) { return chunk[chunk.length - 1]; });
      const indices = Array.from(new Set(records.flatMap(function (r) {
        return r.gpus.map(function (g) { return g.index; });
      }))).sort(function (a, b) { return a - b; });
      METRICS.forEach(function (m) {
        const series = indices.map(function (i) {
          const values = records.map(function (r) {
            const gpu = r.gpus.find(function (g) { return g.index === i; });
            return gpu ? gpu[m.field] : null;
          });
          return { label: "GPU " + i, values: buckets(values, size, mean) };
        });
        const labels = series.map(function (s) { return s.label; }).join();
        const known = charts[m.id];
        if (known && known.labels === labels) {
          known.chart.update(x, series);
        } else { // uPlot's series are fixed: a GPU that appears needs a new chart
          charts[m.id] = {
            labels: labels,
            chart: kitt.chart(el(m.id), {
              title: m.title, x: x, time: true, xLabel: "Time", yLabel: m.yLabel,
              series: series, digits: 1,
            }),
          };
        }
      });
      const period = range === "hour" ? "the last hour" : "the last day";
      let note = records.length + " heartbeats in " + period
        + (size > 1 ? ", shown as " + x.length + " averages" : "") + ".";
      if (!records.length) note = "No heartbeats in " + period + ".";
      else if (!indices.length) note += " This agent reports no GPUs.";
      if (truncated) note += " (Only the newest " + LIMIT.toLocaleString("en-US") + ".)";
      el("history-note").textContent = note;
    }

    function showLatest() {
      const r = records[records.length - 1];
      if (!r) return;
      const uptime = el("agent-uptime");
      uptime.dataset.seconds = r.uptime_s;
      uptime.textContent = kitt.fmt.duration(r.uptime_s);
    }

    function sync() {
      if (busy) { again = true; return; }
      busy = true;
      const mine = generation;
      const since = records.length ? records[records.length - 1].ts
        : new Date(Date.now() - RANGES[range] * 1000).toISOString();
      const url = byId + "/heartbeats?limit=" + LIMIT + "&since=" + encodeURIComponent(since);
      kitt.api("GET", url).then(function (data) {
        if (mine !== generation) return;
        if (!records.length) truncated = data.heartbeats.length === LIMIT;
        records = records.concat(data.heartbeats);
        render();
        showLatest();
      }).catch(function (err) {
        if (!gone) kitt.flash("Heartbeat history: " + err.message, "error");
      }).finally(function () {
        busy = false;
        if (again || mine !== generation) {
          again = false;
          if (!gone) sync();
        }
      });
    }

    function update(a) {
      fmt.setBadge(el("agent-state"), a);
      el("agent-revoked").hidden = !a.revoked;
      el("agent-seen").replaceChildren(fmt.timeEl(a.last_seen_at, true));
      el("agent-task").replaceChildren(fmt.testLink(a.current_task));
      if (lastSeen !== undefined && a.last_seen_at !== lastSeen) sync();
      lastSeen = a.last_seen_at;
    }

    function markGone() {
      gone = true;
      const badge = el("agent-state");
      badge.className = "badge offline";
      badge.textContent = "removed";
      el("agent-actions").querySelectorAll("button").forEach(function (b) { b.disabled = true; });
    }

    function act(dialogId, action) {
      const dialog = el(dialogId);
      dialog.addEventListener("close", function () {
        if (dialog.returnValue === "confirm") action();
      });
    }

    act("revoke-dialog", function () {
      kitt.api("POST", byId + "/revoke").then(function (r) {
        el("agent-revoked").hidden = false;
        kitt.flash("Credential of " + r.name + " revoked: it can no longer heartbeat or report.", "ok");
      }, function (err) { kitt.flash(err.message, "error"); });
    });
    act("remove-dialog", function () {
      kitt.api("DELETE", byId).then(function (r) {
        markGone();
        const closed = r.closed_tests.length;
        kitt.flash("Agent " + r.name + " removed" + (closed ? "; " + closed + " unfinished tests closed" : "") + ".", "ok");
      }, function (err) { kitt.flash(err.message, "error"); });
    });
    document.querySelectorAll("[data-confirm]").forEach(function (button) {
      button.addEventListener("click", function () {
        const dialog = el(button.dataset.confirm);
        dialog.returnValue = ""; // Escape must not repeat the last confirmation
        dialog.showModal();
      });
    });

    document.querySelectorAll('input[name="range"]').forEach(function (radio) {
      radio.addEventListener("change", function () {
        if (!radio.checked) return;
        range = radio.value;
        generation += 1;
        records = [];
        sync();
      });
    });

    const uptime = el("agent-uptime");
    if (uptime.dataset.seconds) uptime.textContent = kitt.fmt.duration(Number(uptime.dataset.seconds));
    sync();
    kitt.fleetStream({
      snapshot: function (data) {
        const a = data.agents.find(function (x) { return x.id === info.id; });
        if (a) update(a); else markGone();
      },
      agent: function (a) { if (a.id === info.id && !gone) update(a); },
      removed: function (r) { if (r.id === info.id) markGone(); },
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const info = kitt.data("agent-data");
    if (info) agentPage(info);
  });
})();
