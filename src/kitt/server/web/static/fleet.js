/* The fleet, live: the SSE stream both fleet pages read, and the fleet table.
 *
 * kitt.fleetStream({snapshot, agent, removed}) opens EventSource('/api/v1/fleet/events')
 * and shows the connection in #live ("live" / "reconnecting…"). The server sends a
 * `snapshot` (every agent) on each connect, then `agent` (one changed summary) and
 * `removed`; it coalesces heartbeats, so nothing here polls.
 *
 * The fleet page (#fleet-table) is rendered whole by the server; this keeps its rows
 * current, adds rows for new agents (cloned from <template id="fleet-row">), and filters
 * rows by status and GPU in place, reflecting the filter in the URL (?status=&gpu=),
 * which the server applies the same way on first render (fleet_pages.py).
 */
(function () {
  "use strict";

  function say(text, state) {
    const live = document.getElementById("live");
    if (!live) return;
    live.hidden = false;
    live.textContent = text;
    live.dataset.state = state;
  }

  function fleetStream(handlers) {
    let source = null;
    let retryMs = 2000;
    function connect() {
      source = new EventSource("/api/v1/fleet/events");
      source.addEventListener("open", function () {
        say("live", "live");
        retryMs = 2000;
      });
      source.addEventListener("error", function () {
        say("reconnecting…", "down");
        if (source.readyState !== EventSource.CLOSED) return; // the browser retries itself
        // Refused (a 401 after the session ended, a 503 when streams are full): the browser
        // gives up on such answers. A signed-out user goes to the login page; otherwise
        // try again, less and less often.
        // (kitt.api goes to the login page on a 401.)
        kitt.api("GET", "/api/v1/agents").catch(function () { /* retried below */ }).then(function () {
          setTimeout(connect, retryMs);
          retryMs = Math.min(retryMs * 2, 30000);
        });
      });
      ["snapshot", "agent", "removed"].forEach(function (name) {
        source.addEventListener(name, function (e) {
          if (handlers[name]) handlers[name](JSON.parse(e.data));
        });
      });
    }
    connect();
    window.addEventListener("pagehide", function () { if (source) source.close(); });
  }

  /* The words and formats of fleet_macros.html. */
  function statusWords(a) { return a.state === "offline" ? "offline" : "online · " + a.state; }
  function utc(iso) { return new Date(iso).toISOString().slice(0, 16).replace("T", " ") + " UTC"; }
  function timeEl(iso, ago) {
    if (!iso) return document.createTextNode(ago ? "never" : "–");
    const t = document.createElement("time");
    t.dateTime = iso;
    if (ago) {
      t.dataset.ago = iso;
      t.textContent = kitt.fmt.ago(iso);
      t.title = kitt.fmt.time(iso);
    } else {
      t.textContent = utc(iso);
    }
    return t;
  }
  function testLink(testId) {
    if (!testId) return document.createTextNode("–");
    const a = document.createElement("a");
    a.href = "/tests/" + encodeURIComponent(testId);
    a.textContent = testId;
    return a;
  }
  function setBadge(el, a) {
    el.className = "badge " + a.state;
    el.textContent = statusWords(a);
  }

  window.kitt = window.kitt || {};
  Object.assign(window.kitt, {
    fleetStream: fleetStream,
    fleetFmt: { statusWords: statusWords, utc: utc, timeEl: timeEl, testLink: testLink, setBadge: setBadge },
  });

  /* --- the fleet page ------------------------------------------------------------------ */

  function statusMatches(state, wanted) {
    if (wanted === "online") return state !== "offline";
    return !wanted || state === wanted;
  }

  function fleetPage(table) {
    const body = table.tBodies[0];
    const template = document.getElementById("fleet-row");
    const form = document.getElementById("fleet-filter");
    const status = document.getElementById("filter-status");
    const gpu = document.getElementById("filter-gpu");
    const models = document.getElementById("gpu-models");
    const count = document.getElementById("fleet-count");
    const empty = document.getElementById("fleet-empty");
    const noMatch = document.getElementById("fleet-no-match");

    const rows = function () { return Array.from(body.rows); };
    const rowOf = function (id) { return rows().find(function (r) { return r.dataset.id === id; }); };
    const field = function (tr, name) { return tr.querySelector('[data-field="' + name + '"]'); };

    function shows(tr) {
      const wanted = gpu.value.trim().toLowerCase();
      return statusMatches(tr.dataset.state, status.value)
        && tr.dataset.gpu.toLowerCase().includes(wanted);
    }

    function applyFilter() {
      let shown = 0;
      rows().forEach(function (tr) {
        tr.hidden = !shows(tr);
        if (!tr.hidden) shown += 1;
      });
      const total = body.rows.length;
      count.textContent = "Showing " + shown + " of " + total + " agents";
      empty.hidden = total > 0;
      noMatch.hidden = total === 0 || shown > 0;
    }

    function reflectInUrl() {
      const query = new URLSearchParams();
      if (status.value) query.set("status", status.value);
      if (gpu.value.trim()) query.set("gpu", gpu.value.trim());
      const qs = query.toString();
      history.replaceState(null, "", location.pathname + (qs ? "?" + qs : ""));
      status.removeAttribute("aria-invalid");
      status.removeAttribute("aria-describedby");
      const error = document.getElementById("filter-status-error");
      if (error) error.remove();
    }

    function addModels(gpuInfo) {
      const known = Array.from(models.options).map(function (o) { return o.value; });
      (gpuInfo || "").split(", ").forEach(function (part) {
        const model = part.replace(/^\d+x /, "");
        if (model && !known.includes(model)) {
          const option = document.createElement("option");
          option.value = model;
          models.appendChild(option);
          known.push(model);
        }
      });
    }

    function fill(tr, a) {
      tr.dataset.id = a.id;
      tr.dataset.name = a.name;
      tr.dataset.state = a.state;
      tr.dataset.gpu = a.gpu_info || "";
      const name = field(tr, "name");
      name.textContent = a.name;
      name.href = "/fleet/" + encodeURIComponent(a.name);
      setBadge(field(tr, "state"), a);
      field(tr, "revoked").hidden = !a.revoked;
      field(tr, "task").replaceChildren(testLink(a.current_task));
      field(tr, "gpus").textContent = a.gpu_info || "none";
      field(tr, "util-bar").style.width = (a.gpu_utilization_pct || 0) + "%";
      field(tr, "util").textContent = kitt.fmt.pct(a.gpu_utilization_pct);
      field(tr, "memory").textContent = kitt.fmt.gb(a.gpu_memory_used_gb);
      field(tr, "seen").replaceChildren(timeEl(a.last_seen_at, true));
      field(tr, "cert").replaceChildren(timeEl(a.cert_expires_at, false));
      addModels(a.gpu_info);
    }

    function place(a) {
      let tr = rowOf(a.id);
      if (!tr) {
        tr = template.content.firstElementChild.cloneNode(true);
        const after = rows().find(function (r) { return r.dataset.name > a.name; });
        body.insertBefore(tr, after || null);
      }
      fill(tr, a);
    }

    fleetStream({
      snapshot: function (data) {
        const ids = new Set(data.agents.map(function (a) { return a.id; }));
        rows().forEach(function (tr) { if (!ids.has(tr.dataset.id)) tr.remove(); });
        data.agents.forEach(place);
        applyFilter();
      },
      agent: function (a) { place(a); applyFilter(); },
      removed: function (gone) {
        const tr = rowOf(gone.id);
        if (tr) tr.remove();
        applyFilter();
      },
    });

    form.addEventListener("submit", function (e) {
      e.preventDefault();
      applyFilter();
      reflectInUrl();
    });
    [status, gpu].forEach(function (input) {
      input.addEventListener(input === status ? "change" : "input", function () {
        applyFilter();
        reflectInUrl();
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const table = document.getElementById("fleet-table");
    if (table) fleetPage(table);
  });
})();
