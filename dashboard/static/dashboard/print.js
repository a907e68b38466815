// The "Print / save as PDF" button: shown only when JavaScript can run it.
(function () {
  for (const button of document.querySelectorAll("[data-print]")) {
    button.hidden = false;
    button.addEventListener("click", () => window.print());
  }
})();
