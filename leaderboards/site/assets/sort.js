/* SalBench site: sortable tables (no dependencies). A header button sorts its column: numbers
   numerically (data-type="number"), text by locale; missing values (empty data-sort, NaN) stay last
   in both directions; ties keep the board's order (data-row). aria-sort marks the sorted header. */
"use strict";
(function () {
  function sortKey(cell) {
    var v = cell.getAttribute("data-sort");
    return v === null ? cell.textContent.trim() : v;
  }
  function asNumber(s) {
    if (s === "") return NaN;
    var x = Number(s);
    return isFinite(x) ? x : NaN;
  }
  function sortBy(table, col, th) {
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    var numeric = th.getAttribute("data-type") === "number";
    var body = table.tBodies[0];
    var rows = Array.prototype.map.call(body.rows, function (r) {
      var k = sortKey(r.cells[col]);
      return { row: r, order: Number(r.getAttribute("data-row")), key: numeric ? asNumber(k) : k };
    });
    rows.sort(function (a, b) {
      var am = numeric ? isNaN(a.key) : a.key === "";
      var bm = numeric ? isNaN(b.key) : b.key === "";
      if (am || bm) return am === bm ? a.order - b.order : (am ? 1 : -1);
      var c = numeric ? a.key - b.key : a.key.localeCompare(b.key, "en", { numeric: true });
      if (c !== 0) return ascending ? c : -c;
      return a.order - b.order;
    });
    rows.forEach(function (o) { body.appendChild(o.row); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }
  function init() {
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
        var button = th.querySelector("button");
        if (button) button.addEventListener("click", function () { sortBy(table, col, th); });
      });
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
