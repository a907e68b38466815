// Draws the overview's charts with uPlot from the JSON the page embeds (#overview-chart).
// The same numbers are in the table under the charts, for screen readers and printing.
(function () {
  "use strict";

  const source = document.getElementById("overview-chart");
  if (!source || typeof uPlot === "undefined") return;
  const data = JSON.parse(source.textContent);

  const COLORS = { blue: "#0b5cad", red: "#b42318", green: "#1e6b34", amber: "#b54708" };
  const toDollars = (nanos) => nanos / 1e9; // drawing only: the tables show exact amounts

  function line(label, stroke, extra) {
    return Object.assign({ label: label, stroke: stroke, width: 2, spanGaps: false }, extra || {});
  }

  const charts = [
    {
      id: "chart-requests",
      series: [line("Requests", COLORS.blue), line("Errors", COLORS.red, { dash: [6, 3] })],
      values: [data.requests, data.errors],
      axis: (value) => String(Math.round(value)),
    },
    {
      id: "chart-spend",
      series: [line("Spend ($)", COLORS.green, { fill: "rgba(30,107,52,0.12)" })],
      values: [data.spend_nanos.map(toDollars)],
      axis: (value) => "$" + value.toFixed(value < 1 ? 4 : 2),
    },
    {
      id: "chart-latency",
      series: [
        line("Latency p50 (ms)", COLORS.blue),
        line("Latency p95 (ms)", COLORS.amber, { dash: [6, 3] }),
        line("TTFT p50 (ms)", COLORS.green),
      ],
      values: [data.latency_p50_ms, data.latency_p95_ms, data.ttft_p50_ms],
      axis: (value) => Math.round(value) + " ms",
    },
  ];

  const drawn = [];

  function size(element) {
    return { width: Math.max(280, element.clientWidth), height: 220 };
  }

  charts.forEach(function (chart) {
    const element = document.getElementById(chart.id);
    if (!element) return;
    const options = Object.assign(size(element), {
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), data.time_zone),
      scales: { x: { time: true } },
      series: [{ label: data.daily ? "Day" : "Hour" }].concat(chart.series),
      axes: [{}, { values: (u, ticks) => ticks.map(chart.axis), size: 70 }],
      legend: { live: true },
    });
    drawn.push({ element: element, plot: new uPlot(options, [data.t].concat(chart.values), element) });
  });

  let pending = null;
  window.addEventListener("resize", function () {
    clearTimeout(pending);
    pending = setTimeout(function () {
      drawn.forEach((entry) => entry.plot.setSize(size(entry.element)));
    }, 150);
  });
})();
