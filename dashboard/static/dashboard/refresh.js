// Re-fetch this page every few seconds and swap in the fresh table, so live state
// updates without a reload. Without JavaScript the page still works (reload by hand).
(function () {
  const script = document.currentScript;
  const selector = script.dataset.target;
  const every = Number(script.dataset.every) || 5000;
  async function refresh() {
    try {
      const response = await fetch(window.location.href, { credentials: "same-origin" });
      if (!response.ok) return;
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.querySelector(selector);
      const current = document.querySelector(selector);
      if (fresh && current) current.replaceWith(fresh);
    } catch (error) {
      // Offline for a moment: keep what is on screen and try again next time.
    }
  }
  setInterval(refresh, every);
})();
