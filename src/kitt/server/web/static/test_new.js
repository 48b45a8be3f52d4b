/* Run-a-test form: narrow the benchmark and engine choices to what the chosen agent
 * offers (every agent's offers for "any idle agent"), and show the serving benchmark's
 * fields only for it. Without this script the form lists everything and the server
 * says what does not fit, beside the field.
 *
 * Data: <script type="application/json" id="agent-offers">[{name, state, benchmarks,
 * engines}, …]</script>.
 */
(function () {
  "use strict";

  function narrow(select, allowed, keepBlank) {
    if (!select) return;
    Array.prototype.forEach.call(select.options, function (opt) {
      const ok = (keepBlank && opt.value === "") || allowed.has(opt.value);
      opt.hidden = !ok;
      opt.disabled = !ok;
    });
    const current = select.options[select.selectedIndex];
    if (current && current.disabled) {
      const first = Array.prototype.find.call(select.options, function (o) { return !o.disabled; });
      if (first) select.value = first.value;
    }
  }

  function apply(form) {
    const offers = kitt.data("agent-offers") || [];
    const agent = form.querySelector("#agent").value;
    const pool = agent === "any" ? offers : offers.filter(function (o) { return o.name === agent; });
    const benchmarks = new Set(["serving"]);
    const engines = new Set();
    pool.forEach(function (o) {
      o.benchmarks.forEach(function (b) { benchmarks.add(b); });
      o.engines.forEach(function (e) { engines.add(e); });
    });
    narrow(form.querySelector("#benchmark"), benchmarks, false);
    narrow(form.querySelector("#engine"), engines, true);
    const serving = form.querySelector("#benchmark").value === "serving";
    form.querySelectorAll("[data-serving-only]").forEach(function (el) { el.hidden = !serving; });
    const model = form.querySelector("#model");
    if (serving) model.setAttribute("aria-required", "true");
    else model.removeAttribute("aria-required");
  }

  function formOf(target) {
    return target && target.closest ? target.closest("#test-form") : null;
  }

  document.addEventListener("change", function (e) {
    const form = formOf(e.target);
    if (form && (e.target.id === "agent" || e.target.id === "benchmark")) apply(form);
  });
  document.addEventListener("DOMContentLoaded", function () {
    const form = document.getElementById("test-form");
    if (form) apply(form);
  });
  // A refused form comes back from the server whole: narrow its choices again.
  document.addEventListener("htmx:afterSwap", function () {
    const form = document.getElementById("test-form");
    if (form) apply(form);
  });
})();
