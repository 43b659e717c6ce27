"""The report page's fixed parts: content policy, stylesheet and the small scripts."""

__all__ = ["FONT", "MONO", "CSP", "STYLE", "ERROR_COLLECTOR", "SORT_SCRIPT", "DRILL_SCRIPT"]

FONT = "-apple-system, 'Segoe UI', Helvetica, Arial, sans-serif"
MONO = "ui-monospace, 'SFMono-Regular', Menlo, Consolas, monospace"

# nothing may be fetched: the page works offline and cannot leak what it shows
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src data: blob:; font-src data:")

STYLE = """
:root { --bad: #cf222e; --warn: #9a6700; --ok: #1a7f37; --line: #d8dee4; --muted: #57606a; }
* { box-sizing: border-box; }
body { margin: 0; background: #f6f8fa; color: #1f2328;
       font: 14px/1.5 -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; }
main { max-width: 1360px; margin: 0 auto; padding: 24px 28px 8px; }
header { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 18px 22px; }
h1 { margin: 0; font-size: 22px; }
h2 { font-size: 18px; margin: 28px 0 8px; }
.path { margin: 2px 0 14px; color: var(--muted); font-family: ui-monospace, Menlo, Consolas, monospace;
        word-break: break-all; }
.facts { display: flex; flex-wrap: wrap; gap: 10px 28px; align-items: center; }
.facts span { display: block; color: var(--muted); font-size: 12px; text-transform: uppercase;
              letter-spacing: .04em; }
.facts b { font-size: 16px; }
.verdict { margin-left: auto; padding: 6px 14px; border-radius: 20px; font-weight: 600; color: #fff; }
.verdict.ok { background: var(--ok); }
.verdict.bad { background: var(--bad); }
.ok-note { color: var(--ok); }
.note { color: var(--muted); }
.name { font-family: ui-monospace, 'SFMono-Regular', Menlo, Consolas, monospace; font-size: 13px; }
.badge { display: inline-block; padding: 0 7px; border-radius: 10px; font-size: 12px; color: #fff;
         font-weight: 600; }
.badge.bad { background: var(--bad); }
.badge.warn { background: #bf8700; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px;
        margin-bottom: 14px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr)); gap: 12px; }
.grid .card { margin: 0; }
.hist-title { font-weight: 600; padding: 2px 6px 0; overflow-wrap: anywhere; }
.drill { position: sticky; top: 0; background: #ddf4ff; border: 1px solid #54aeff; border-radius: 6px;
         padding: 4px 10px; }
.hist-sub { color: var(--muted); font-size: 12px; padding: 0 6px; }
table { border-collapse: collapse; background: #fff; width: 100%; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; }
th { background: #eef1f4; position: sticky; top: 0; font-weight: 600; white-space: nowrap; }
table.sortable th { cursor: pointer; }
table.sortable th[aria-sort=ascending]::after { content: " ▲"; }
table.sortable th[aria-sort=descending]::after { content: " ▼"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.bad td { background: #ffebe9; }
tr.warn td { background: #fff8c5; }
.table-wrap { border: 1px solid var(--line); border-radius: 8px; overflow: auto; max-height: 80vh; }
.tied { color: var(--muted); }
.muted { color: var(--muted); }
footer { max-width: 1360px; margin: 0 auto; padding: 8px 28px 28px; color: var(--muted); font-size: 12px; }
"""

# collects script errors, CSP violations and console.error calls into #ws-errors, so a test (or a
# reader opening the element) can see that every plot rendered
ERROR_COLLECTOR = """
(function () {
  var box = document.getElementById('ws-errors');
  function note(text) { box.textContent += text + '\\n'; }
  window.addEventListener('error', function (e) {
    var where = e.filename ? ' (' + e.filename + ':' + e.lineno + ')' : '';
    note('error: ' + (e.message || (e.target && e.target.outerHTML) || e.type) + where);
  }, true);
  window.addEventListener('unhandledrejection', function (e) { note('unhandled: ' + e.reason); });
  document.addEventListener('securitypolicyviolation', function (e) {
    note('blocked: ' + e.violatedDirective + ' ' + e.blockedURI);
  });
  var original = console.error;
  console.error = function () {
    note('console.error: ' + Array.prototype.join.call(arguments, ' '));
    return original.apply(console, arguments);
  };
})();
"""

SORT_SCRIPT = """
(function () {
  function value(row, col) {
    var cell = row.cells[col], v = cell && cell.getAttribute('data-v');
    return v === null || v === undefined ? (cell ? cell.textContent : '') : parseFloat(v);
  }
  function compare(x, y) {
    if (typeof x === 'number' && typeof y === 'number') {
      if (isNaN(x)) { return isNaN(y) ? 0 : 1; }
      return isNaN(y) ? -1 : x - y;
    }
    return String(x).localeCompare(String(y), undefined, {numeric: true});
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    table.querySelectorAll('th').forEach(function (th, col) {
      th.addEventListener('click', function () {
        var up = th.getAttribute('aria-sort') !== 'ascending';
        table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', up ? 'ascending' : 'descending');
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) { var r = compare(value(a, col), value(b, col)); return up ? r : -r; });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
})();
"""

# drill-down: a click on a block of the heatmap lists that block's tensors in the table
DRILL_SCRIPT = """
(function () {
  var bar = document.getElementById('ws-drill');
  var card = document.querySelector('[data-drill]');
  if (!bar || !card) { return; }
  var rows = document.querySelectorAll('table.params tbody tr');
  function show(block) {
    var n = 0;
    rows.forEach(function (r) {
      var hit = block === null || r.getAttribute('data-block') === block;
      r.hidden = !hit; n += hit ? 1 : 0;
    });
    bar.hidden = block === null;
    if (block !== null) {
      bar.querySelector('span').textContent = 'Showing the ' + n + ' tensor(s) of block ' + block + '.';
      bar.scrollIntoView({block: 'start'});
    }
  }
  bar.querySelector('button').addEventListener('click', function () { show(null); });
  var fig = document.getElementById(card.getAttribute('data-drill'));
  function hook() {
    if (fig && fig.on) { fig.on('plotly_click', function (e) { show(String(e.points[0].y)); }); }
    else { setTimeout(hook, 100); }
  }
  hook();
})();
"""
