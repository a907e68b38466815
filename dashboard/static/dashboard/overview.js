// The overview's live feed: a websocket pushes each new request; rows are prepended to
// #live-feed (newest first, capped) and the tiles move by the pushed amounts, no reload.
// Everything from the server is written with textContent, never as HTML.
(function () {
  "use strict";

  const live = document.getElementById("live");
  if (!live || !("WebSocket" in window)) return;
  const table = document.getElementById("live-feed");
  const body = table.tBodies[0];
  const status = document.getElementById("live-status");
  const empty = document.getElementById("live-empty");
  const tiles = document.getElementById("overview-tiles");
  const limit = parseInt(live.dataset.limit, 10) || 50;
  const timeOfDay = new Intl.DateTimeFormat(undefined, {
    hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
    timeZone: live.dataset.timeZone || "UTC",
  });
  // Closed for good: signed out (4403) or not in this org any more (4404).
  const FINAL_CODES = [4403, 4404];
  let retries = 0;

  // Nano-USD (an integer) as "$1,234.56" with half-up rounding, like the usd filter.
  function usd(nanos, places) {
    const scale = 10n ** BigInt(9 - places);
    const units = (BigInt(nanos) * 2n + scale) / (2n * scale);
    const whole = units / 10n ** BigInt(places);
    const digits = places ? "." + (units % 10n ** BigInt(places)).toString().padStart(places, "0") : "";
    return "$" + whole.toLocaleString("en-US") + digits;
  }

  function setStatus(text, kind) {
    status.textContent = text;
    status.className = "badge " + kind;
  }

  function cell(row, text, className) {
    const td = row.insertCell();
    if (className) td.className = className;
    td.textContent = text;
    return td;
  }

  function addRow(request) {
    if (body.querySelector('tr[data-event-id="' + CSS.escape(request.id) + '"]')) return false;
    const row = document.createElement("tr");
    row.dataset.eventId = request.id;
    row.className = request.outcome;
    cell(row, timeOfDay.format(new Date(request.started_at)));
    const code = document.createElement("code");
    code.textContent = request.key_prefix || "—";
    cell(row, "").appendChild(code);
    const model = cell(row, request.model || "—");
    if (request.is_stream) {
      const tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = "stream";
      model.append(" ", tag);
    }
    cell(row, String(request.status_code), "num");
    cell(row, request.input_tokens + " / " + request.output_tokens, "num");
    cell(row, usd(request.cost_nanos, 6), "num");
    cell(row, request.latency_ms === null ? "—" : request.latency_ms + " ms", "num");
    body.insertBefore(row, body.firstChild);
    while (body.rows.length > limit) body.deleteRow(body.rows.length - 1);
    return true;
  }

  function within(moment, start, end) {
    return moment >= new Date(start) && (!end || moment < new Date(end));
  }

  function bump(testId, nanos, requests) {
    const element = tiles && tiles.querySelector('[data-testid="' + testId + '"]');
    if (!element) return;
    if (nanos !== null) {
      const total = BigInt(element.dataset.nanos || "0") + BigInt(nanos);
      element.dataset.nanos = total.toString();
      element.textContent = usd(total, 2);
    } else {
      const count = parseInt(element.dataset.count || "0", 10) + requests;
      element.dataset.count = String(count);
      element.textContent = String(count);
    }
  }

  function receive(requests) {
    requests.forEach(function (request) {
      if (!addRow(request) || !tiles) return;
      const started = new Date(request.started_at);
      const data = tiles.dataset;
      if (within(started, data.dayStart, data.dayEnd)) {
        bump("spend-today", request.cost_nanos);
        bump("requests-today", null, 1);
      }
      if (within(started, data.monthStart, data.monthEnd)) bump("spend-month", request.cost_nanos);
    });
    if (empty && body.rows.length) empty.hidden = true;
    // The first request of a new org: the "send a request" prompt has done its job.
    const prompt = document.getElementById("overview-empty");
    if (prompt && body.rows.length) prompt.hidden = true;
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const socket = new WebSocket(scheme + location.host + live.dataset.socketPath);
    socket.addEventListener("message", function (event) {
      const message = JSON.parse(event.data);
      if (message.type === "ready") {
        retries = 0;
        setStatus("Live", "ok");
      } else if (message.type === "requests") {
        receive(message.requests);
      }
    });
    socket.addEventListener("close", function (event) {
      if (FINAL_CODES.includes(event.code)) {
        setStatus("Not connected: reload the page to sign in again", "bad");
        return;
      }
      // Back off: 1 s, 2 s, 4 s… up to 30 s, with jitter so tabs do not reconnect in step.
      const delay = Math.min(30000, 1000 * 2 ** retries) * (0.75 + Math.random() / 2);
      retries += 1;
      setStatus("Reconnecting…", "warn");
      setTimeout(connect, delay);
    });
  }

  connect();
})();
