/* Results list (and the comparison's share box): the selection count, a check that at
 * least two results are selected before comparing, "Copy link", and the filters'
 * aria-invalid after htmx replaced the list. Everything works without it: the forms are
 * plain GETs, and the compare page answers a clear error for a wrong selection.
 */
(function () {
  "use strict";
  const MIN = 2, MAX = 10;

  function picked() {
    return document.querySelectorAll('#compare-form input[name="ids"]:checked').length;
  }

  function hint(text, isError) {
    const el = document.getElementById("compare-hint");
    if (!el) return;
    el.textContent = text;
    el.classList.toggle("field-error", !!isError);
  }

  function countSelected() {
    const n = picked();
    hint(n + " selected" + (n < MIN ? " (select at least " + MIN + ")" : n > MAX ? " (at most " + MAX + ")" : ""), false);
  }

  document.addEventListener("change", function (e) {
    if (e.target.matches && e.target.matches('#compare-form input[name="ids"]')) countSelected();
  });

  document.addEventListener("submit", function (e) {
    if (e.target.id !== "compare-form") return;
    const n = picked();
    if (n < MIN || n > MAX) {
      e.preventDefault();
      hint(n < MIN ? "Select at least " + MIN + " results to compare (" + n + " selected)."
                   : "Select at most " + MAX + " results (" + n + " selected).", true);
      const first = document.querySelector('#compare-form input[name="ids"]');
      if (first) first.focus();
    }
  });

  async function copy(input) {
    try {
      await navigator.clipboard.writeText(input.value);
    } catch (err) {
      input.select();
      if (!document.execCommand("copy")) {
        kitt.flash("Copying is not allowed here: the link is selected, copy it with Ctrl+C.", "info");
        return;
      }
    }
    kitt.flash("Link copied.", "ok");
  }

  document.addEventListener("click", function (e) {
    const button = e.target.closest && e.target.closest("button[data-copy]");
    if (!button) return;
    const input = document.getElementById(button.dataset.copy);
    if (input) copy(input);
  });

  /* The filter fields a fresh list says are wrong (the form itself is not replaced). */
  function markInvalid() {
    const error = document.getElementById("filter-error");
    const bad = error ? error.dataset.fields.split(" ") : [];
    document.querySelectorAll("#result-filters input, #result-filters select").forEach(function (field) {
      if (bad.indexOf(field.name) >= 0) field.setAttribute("aria-invalid", "true");
      else field.removeAttribute("aria-invalid");
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.body.addEventListener("htmx:afterSwap", function (e) {
      if (e.target.id === "results-list") markInvalid();
    });
  });
})();
