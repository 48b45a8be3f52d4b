/* The test page: the live log, cancel, and the result's charts.
 *
 * - Log: an EventSource on /api/v1/tests/<id>/logs. `log` events carry id = seq, so the
 *   browser's own reconnect (after a dropped connection or a server restart) sends
 *   Last-Event-ID and the server resumes after it; lines are also kept only once by seq,
 *   whatever a server sends. A stream the browser gave up on (an HTTP error) is opened
 *   again with ?after=<last seq>, waiting longer each time. `end` with a final status
 *   closes it for good (else the browser would reconnect); `end` with a live status is
 *   a server going down, and the reconnect resumes.
 * - Auto-scroll follows new lines while the reader is at the bottom; scrolling up pauses
 *   it ("Jump to latest" shows), scrolling back down resumes it.
 * - Search hides the lines without the text and marks it in the others (DOM nodes, never
 *   markup from data), with a count.
 * - `status` events (and each (re)connection, which may have missed some) ask htmx for
 *   the facts fragment again; the end asks for the result fragment, whose charts are
 *   drawn here with kitt.chart from the specs in its data-spec attributes.
 */
(function () {
  "use strict";
  const MAX_LINES = 20000;
  const FIRST_RETRY_MS = 2000;
  const MAX_RETRY_MS = 30000;

  function refresh(id) {
    const el = document.getElementById(id);
    if (el) el.dispatchEvent(new Event("kitt-refresh"));
  }

  function LogView(box, jump, search, count) {
    const entries = [];
    let pending = [];
    let lastSeq = 0;
    let query = "";
    let follow = true;
    let scheduled = false;

    function atBottom() {
      return box.scrollHeight - box.scrollTop - box.clientHeight < 4;
    }

    box.addEventListener("scroll", function () {
      follow = atBottom();
      jump.hidden = follow;
    });
    jump.addEventListener("click", function () {
      follow = true;
      jump.hidden = true;
      box.scrollTop = box.scrollHeight;
      box.focus();
    });

    // Marks every occurrence of the query in the line; returns whether there was one.
    function render(entry) {
      const el = entry.el;
      el.textContent = "";
      const text = entry.text;
      // Case-insensitive when lower-casing keeps positions (it nearly always does).
      const hay = entry.lower.length === text.length ? entry.lower : text;
      let at = query ? hay.indexOf(query) : -1;
      if (at < 0) {
        el.textContent = text;
        el.classList.toggle("hidden", query !== "");
        return false;
      }
      let from = 0;
      while (at >= 0) {
        if (at > from) el.appendChild(document.createTextNode(text.slice(from, at)));
        const mark = document.createElement("mark");
        mark.textContent = text.slice(at, at + query.length);
        el.appendChild(mark);
        from = at + query.length;
        at = hay.indexOf(query, from);
      }
      if (from < text.length) el.appendChild(document.createTextNode(text.slice(from)));
      el.classList.remove("hidden");
      return true;
    }

    let matches = 0;
    function showCount() {
      if (!query) {
        count.textContent = "";
        return;
      }
      const total = entries.length;
      count.textContent = matches + (matches === 1 ? " line matches" : " lines match") +
        " (of " + total + ")";
    }

    function flush() {
      scheduled = false;
      const fragment = document.createDocumentFragment();
      pending.forEach(function (entry) {
        if (render(entry)) matches += 1;
        fragment.appendChild(entry.el);
      });
      pending = [];
      box.appendChild(fragment);
      while (entries.length > MAX_LINES) {
        const old = entries.shift();
        if (query && !old.el.classList.contains("hidden")) matches -= 1;
        old.el.remove();
      }
      showCount();
      if (follow) box.scrollTop = box.scrollHeight;
    }

    function add(seq, text) {
      if (seq <= lastSeq) return; // already shown: a resumed stream never repeats a line
      lastSeq = seq;
      const el = document.createElement("span");
      el.className = "line";
      el.dataset.seq = String(seq);
      const entry = { seq: seq, text: text, lower: text.toLowerCase(), el: el };
      entries.push(entry);
      pending.push(entry);
      if (!scheduled) {
        scheduled = true;
        requestAnimationFrame(flush);
      }
    }

    function setQuery(text) {
      query = text.toLowerCase();
      matches = 0;
      entries.forEach(function (entry) {
        if (pending.indexOf(entry) < 0 && render(entry)) matches += 1;
      });
      showCount();
      if (follow) box.scrollTop = box.scrollHeight;
    }
    search.addEventListener("input", function () { setQuery(search.value); });

    return { add: add, lastSeq: function () { return lastSeq; } };
  }

  function stream(page, view, setState) {
    const terminal = new Set(page.terminal);
    let source = null;
    let retryMs = FIRST_RETRY_MS;
    let done = false;

    function connect() {
      const after = view.lastSeq();
      source = new EventSource(after ? page.logs + "?after=" + after : page.logs);
      source.addEventListener("open", function () {
        retryMs = FIRST_RETRY_MS;
        setState("Live: new lines appear as the agent sends them.");
        refresh("test-facts"); // anything that changed while we were not connected
      });
      source.addEventListener("log", function (e) {
        const data = JSON.parse(e.data);
        view.add(data.seq, data.line);
      });
      source.addEventListener("status", function () { refresh("test-facts"); });
      source.addEventListener("end", function (e) {
        const data = JSON.parse(e.data);
        if (!terminal.has(data.status) && data.status !== "deleted") return; // server stopping
        done = true;
        source.close();
        setState("Ended: the test is " + data.status + ".");
        refresh("test-facts");
        if (!document.getElementById("result-heading")) refresh("test-result");
      });
      source.addEventListener("error", function () {
        if (done) return;
        if (source.readyState !== EventSource.CLOSED) {
          setState("Connection lost: reconnecting…");
          return;
        }
        // The browser gave up (an HTTP error): one look says why. kitt.api goes to the
        // login page on 401; a deleted test ends it; anything else, try again later.
        const wait = retryMs;
        retryMs = Math.min(retryMs * 2, MAX_RETRY_MS);
        setState("Connection lost: trying again in " + Math.round(wait / 1000) + " s…");
        kitt.api("GET", page.show).then(function () {
          setTimeout(connect, wait);
        }, function (err) {
          if (err.status === 404) {
            done = true;
            setState("This test no longer exists.");
          } else if (err.status !== 401) {
            setTimeout(connect, wait);
          }
        });
      });
    }
    connect();
  }

  function drawCharts() {
    document.querySelectorAll("#chart-grid .chart-slot").forEach(function (slot) {
      kitt.chart(slot, JSON.parse(slot.dataset.spec));
    });
  }

  async function cancel(page, button) {
    button.disabled = true;
    try {
      await kitt.api("POST", page.cancel);
      kitt.flash("Cancel requested for test " + page.id + ".", "info");
    } catch (err) {
      kitt.flash(err.message, "error");
    }
    refresh("test-facts");
  }

  document.addEventListener("DOMContentLoaded", function () {
    const page = kitt.data("test-page-data");
    if (!page) return;
    const state = document.getElementById("log-state");
    const view = LogView(
      document.getElementById("log"),
      document.getElementById("log-jump"),
      document.getElementById("log-search"),
      document.getElementById("log-matches"),
    );
    stream(page, view, function (text) { state.textContent = text; });
    drawCharts();
    // Durations still growing (waiting, running) tick here; the server is not asked.
    setInterval(function () {
      document.querySelectorAll("#test-facts [data-since]").forEach(function (el) {
        el.textContent = kitt.fmt.duration(Math.max(0, (Date.now() - Date.parse(el.dataset.since)) / 1000));
      });
    }, 1000);
    document.addEventListener("click", function (e) {
      const button = e.target.closest ? e.target.closest("#cancel-test") : null;
      if (button && !button.disabled) cancel(page, button);
    });
    document.body.addEventListener("htmx:afterSwap", function (e) {
      if (e.detail.target && e.detail.target.id === "test-result") drawCharts();
    });
  });
})();
