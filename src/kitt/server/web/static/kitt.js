/* KITT dashboard: what every page shares. Plain JS, no build step.
 *
 * - kitt.api(method, url, body): the REST API with the session cookie and the CSRF
 *   header; resolves to the parsed JSON, rejects with an Error carrying the server's own
 *   message (and .status). A 401 (session ended) goes to the login page.
 * - kitt.flash(text, kind): a message in the page's live region (read by screen readers).
 * - kitt.fmt.*: number and time formatting used by every page.
 * - kitt.data(id): the JSON a page embedded in <script type="application/json" id=…>
 *   (the CSP allows no inline script, and data blocks are not scripts).
 * - <time data-ago="ISO"> elements show "12 s ago" and stay current.
 */
(function () {
  "use strict";
  const meta = document.querySelector('meta[name="csrf-token"]');
  const csrf = meta ? meta.content : "";

  function toLogin() {
    const next = location.pathname + location.search;
    location.assign("/login?next=" + encodeURIComponent(next));
  }

  async function api(method, url, body) {
    const headers = { "Accept": "application/json", "X-CSRF-Token": csrf };
    const init = { method: method, headers: headers, credentials: "same-origin" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(url, init);
    if (response.status === 401) {
      toLogin();
      throw Object.assign(new Error("signed out"), { status: 401 });
    }
    let data = null;
    const text = await response.text();
    if (text) {
      try { data = JSON.parse(text); } catch (e) { data = { error: text }; }
    }
    if (!response.ok) {
      const message = (data && (data.error || data.message)) || response.statusText;
      throw Object.assign(new Error(message), { status: response.status, data: data });
    }
    return data;
  }

  function flash(text, kind) {
    const box = document.getElementById("flash");
    if (!box) return;
    box.textContent = "";
    const p = document.createElement("p");
    p.className = "flash " + (kind || "info");
    p.textContent = text;
    box.appendChild(p);
  }

  function data(id) {
    const el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }

  const fmt = {
    num(v, digits) {
      if (v === null || v === undefined || Number.isNaN(v)) return "–";
      const d = digits === undefined ? (Math.abs(v) >= 100 ? 0 : Math.abs(v) >= 10 ? 1 : 2) : digits;
      return Number(v).toLocaleString("en-US", { minimumFractionDigits: d, maximumFractionDigits: d });
    },
    pct(v) { return v === null || v === undefined ? "–" : fmt.num(v, 0) + " %"; },
    gb(v) { return v === null || v === undefined ? "–" : fmt.num(v, 1) + " GB"; },
    ago(iso) {
      if (!iso) return "never";
      const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
      if (s < 60) return Math.round(s) + " s ago";
      if (s < 3600) return Math.round(s / 60) + " min ago";
      if (s < 86400) return Math.round(s / 3600) + " h ago";
      return Math.round(s / 86400) + " d ago";
    },
    time(iso) { return iso ? new Date(iso).toLocaleString() : "–"; },
    duration(seconds) {
      if (seconds === null || seconds === undefined) return "–";
      if (seconds < 60) return fmt.num(seconds, 1) + " s";
      const m = Math.floor(seconds / 60), s = Math.round(seconds % 60);
      return m < 60 ? m + " min " + s + " s" : Math.floor(m / 60) + " h " + (m % 60) + " min";
    },
  };

  function refreshAgo(root) {
    (root || document).querySelectorAll("time[data-ago]").forEach(function (el) {
      el.textContent = fmt.ago(el.dataset.ago);
      el.title = fmt.time(el.dataset.ago);
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    refreshAgo();
    // Re-renders relative times only; it asks the server nothing.
    setInterval(refreshAgo, 5000);
    document.body.addEventListener("htmx:configRequest", function (e) {
      e.detail.headers["X-CSRF-Token"] = csrf;
    });
    document.body.addEventListener("htmx:afterSwap", function (e) { refreshAgo(e.target); });
    document.body.addEventListener("htmx:responseError", function (e) {
      if (e.detail.xhr.status === 401) return toLogin();
      let message = e.detail.xhr.statusText;
      try { message = JSON.parse(e.detail.xhr.responseText).error || message; } catch (err) { /* text */ }
      flash(message, "error");
    });
  });

  window.kitt = { api: api, csrf: csrf, flash: flash, data: data, fmt: fmt, refreshAgo: refreshAgo, toLogin: toLogin };
})();
