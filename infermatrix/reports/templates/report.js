(function () {
  "use strict";
  var table = document.getElementById("results");
  if (table) {
    var tbody = table.tBodies[0];
    var heads = Array.prototype.slice.call(table.querySelectorAll("thead th[data-col]"));
    var rows = Array.prototype.slice.call(tbody.rows);
    var text = rows.map(function (row) {
      return (row.textContent + " " + (row.getAttribute("data-case-id") || "")).toLowerCase();
    });
    rows.forEach(function (row, i) { row._text = text[i]; });
    var sortBy = function (th) {
      var dir = th.getAttribute("data-sort") === "asc" ? "desc" : "asc";
      heads.forEach(function (h) { h.removeAttribute("data-sort"); h.setAttribute("aria-sort", "none"); });
      th.setAttribute("data-sort", dir);
      th.setAttribute("aria-sort", dir === "asc" ? "ascending" : "descending");
      var index = th.cellIndex, numeric = th.getAttribute("data-type") === "num", sign = dir === "asc" ? 1 : -1;
      var keyed = Array.prototype.slice.call(tbody.rows).map(function (row, pos) {
        var raw = row.cells[index].getAttribute("data-value") || "";
        var key = numeric ? (raw === "" ? NaN : parseFloat(raw)) : raw.toLowerCase();
        var missing = numeric ? isNaN(key) : key === "";
        return {row: row, key: key, missing: missing, pos: pos};
      });
      keyed.sort(function (a, b) {
        if (a.missing || b.missing) { return a.missing === b.missing ? a.pos - b.pos : (a.missing ? 1 : -1); }
        var c = numeric ? (a.key < b.key ? -1 : a.key > b.key ? 1 : 0)
                        : a.key.localeCompare(b.key, undefined, {numeric: true});
        return c !== 0 ? sign * c : a.pos - b.pos;
      });
      var frag = document.createDocumentFragment();
      keyed.forEach(function (k) { frag.appendChild(k.row); });
      tbody.appendChild(frag);
    };
    heads.forEach(function (th) {
      th.addEventListener("click", function () { sortBy(th); });
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(th); }
      });
    });
    var input = document.getElementById("filter");
    var selects = Array.prototype.slice.call(document.querySelectorAll("select.col-filter"));
    var count = document.getElementById("row-count");
    var apply = function () {
      var terms = (input ? input.value : "").toLowerCase().split(/\s+/).filter(Boolean);
      var shown = 0;
      rows.forEach(function (row) {
        var ok = terms.every(function (t) { return row._text.indexOf(t) !== -1; }) &&
          selects.every(function (s) {
            return s.value === "" || row.getAttribute("data-" + s.getAttribute("data-col")) === s.value;
          });
        row.hidden = !ok;
        if (ok) { shown += 1; }
      });
      if (count) { count.textContent = shown + " of " + rows.length + " cases"; }
    };
    if (input) { input.addEventListener("input", apply); }
    selects.forEach(function (s) { s.addEventListener("change", apply); });
    apply();
  }
  var metric = document.getElementById("pareto-metric");
  if (metric) {
    var show = function () {
      Array.prototype.forEach.call(document.querySelectorAll("figure.pareto-fig"), function (f) {
        f.hidden = f.getAttribute("data-metric") !== metric.value;
      });
    };
    metric.addEventListener("change", show);
    show();
  }
})();
