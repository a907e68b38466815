// Draws the cost report's spend per day as bars (uPlot), from the JSON the page embeds
// (#report-chart). The same amounts are in the table under the chart.
(function () {
  "use strict";
  const source = document.getElementById("report-chart");
  const element = document.getElementById("chart-report-spend");
  if (!source || !element || typeof uPlot === "undefined") return;
  const data = JSON.parse(source.textContent);
  if (!data.t.length) return;
  const dollars = data.spend_nanos.map(function (nanos) { return nanos / 1e9; }); // drawing only
  const options = {
    width: Math.max(280, element.clientWidth),
    height: 220,
    scales: { x: { time: true } },
    series: [
      { label: "Day (UTC)" },
      {
        label: "Spend ($)",
        stroke: "#0b5cad",
        fill: "rgba(11,92,173,0.35)",
        paths: uPlot.paths.bars({ size: [0.6, 48] }),
        points: { show: false },
      },
    ],
    axes: [{}, { size: 70, values: function (u, ticks) {
      return ticks.map(function (v) { return "$" + v.toFixed(v < 1 ? 4 : 2); });
    } }],
    tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1e3), "UTC"); },
  };
  const plot = new uPlot(options, [data.t, dollars], element);
  window.addEventListener("resize", function () {
    plot.setSize({ width: Math.max(280, element.clientWidth), height: 220 });
  });
})();
