// Small behaviours shared by every dashboard page; each works without JavaScript too
// (the copy button falls back to a selected field, the confirm to the plain form).
(function () {
  "use strict";

  // <button data-copy="#secret"> copies the text of the element it names.
  document.addEventListener("click", async function (event) {
    const button = event.target.closest("[data-copy]");
    if (!button) return;
    const source = document.querySelector(button.dataset.copy);
    if (!source) return;
    const text = (source.value !== undefined ? source.value : source.textContent).trim();
    try {
      await navigator.clipboard.writeText(text);
    } catch (error) {
      // No clipboard permission (e.g. plain http): select the text so Ctrl+C works.
      const range = document.createRange();
      range.selectNodeContents(source);
      window.getSelection().removeAllRanges();
      window.getSelection().addRange(range);
    }
    const label = button.textContent;
    button.textContent = "Copied";
    button.setAttribute("aria-live", "polite");
    setTimeout(function () { button.textContent = label; }, 2000);
  });

  // <form data-confirm="Revoke this key?"> asks before submitting.
  document.addEventListener("submit", function (event) {
    const form = event.target.closest("form[data-confirm]");
    if (form && !window.confirm(form.dataset.confirm)) event.preventDefault();
  }, true);

  // <select data-autosubmit> submits its form when changed (the org switcher).
  document.addEventListener("change", function (event) {
    if (event.target.matches("select[data-autosubmit]")) event.target.form.requestSubmit();
  });
})();
