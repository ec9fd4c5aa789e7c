"""OUT/report.html: the comparison's summary table, then every pair's two images side by side with their scores,
sortable by any scorer's difference b − a.

Self-contained: the images are links relative to OUT (where the page lives, so the folder can be moved or served as
it is), the style and the sorting script are inline, nothing loads from elsewhere. Every text of the user's (prompts,
model names, settings) is HTML-escaped, so a prompt `<script>` shows as text; the page is UTF-8.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from html import escape
from pathlib import Path
from urllib.parse import quote

from evaluation.layout import PromptId
from schemas.atomic import atomic_write_bytes


@dataclass(frozen=True)
class PairRow:
    prompt_id: PromptId
    seed: int
    prompt: str
    path_a: str  # relative to OUT
    path_b: str
    scores: dict[str, tuple[float, float]]  # scorer label → (a, b); a scorer that lacks the pair is absent


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
#summary td, #summary th { border-bottom: 1px solid #ddd; }
#pairs > tbody > tr { border-top: 1px solid #ccc; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
img.pair { width: 256px; height: auto; display: block; background: #eee; }
.meta { color: #777; font-size: 0.85em; }
.prompt { max-width: 24em; white-space: pre-wrap; }
.win { color: #070; } .loss { color: #a00; }
#controls { margin: 1em 0; }
"""

# Rows carry data-diff-K (b − a of the K-th scorer) and data-order (the prompt order); empty means no score.
SCRIPT = """
const body = document.querySelector('#pairs tbody');
const select = document.getElementById('sort-key');
const button = document.getElementById('sort-dir');
let descending = true;
function sortRows() {
  const key = select.value;
  const value = row => {
    const v = row.dataset[key];
    return v === '' || v === undefined ? NaN : Number(v);
  };
  const rows = Array.from(body.rows);
  rows.sort((x, y) => {
    const a = value(x), b = value(y);
    if (isNaN(a) || isNaN(b)) return isNaN(a) - isNaN(b);
    return key === 'order' ? a - b : (descending ? b - a : a - b);
  });
  rows.forEach(row => body.appendChild(row));
  button.textContent = descending ? 'largest b \\u2212 a first' : 'smallest b \\u2212 a first';
}
select.addEventListener('change', sortRows);
button.addEventListener('click', () => { descending = !descending; sortRows(); });
"""


def _num(x: float) -> str:
    return f"{x:.4f}"


def _summary(result: dict) -> str:
    a, b = escape(result["a"]), escape(result["b"])
    head = (
        "<tr><th>scorer</th><th>version</th><th class=num>pairs</th>"
        f"<th class=num>mean {a}</th><th class=num>mean {b}</th><th class=num>wins / ties / losses of {b}</th>"
        "<th class=num>win rate</th><th class=num>95% CI</th><th class=num>ties as losses</th></tr>"
    )
    rows = []
    for label, s in result["scorers"].items():
        low, high = s["ci95"]
        rows.append(
            f"<tr><td>{escape(label)}</td><td>{escape(s['version'])}</td><td class=num>{s['n']}</td>"
            f"<td class=num>{_num(s['mean_a'])}</td><td class=num>{_num(s['mean_b'])}</td>"
            f"<td class=num>{s['wins']} / {s['ties']} / {s['losses']}</td>"
            f"<td class=num><b>{s['win_rate']:.3f}</b></td><td class=num>[{low:.3f}, {high:.3f}]</td>"
            f"<td class=num>{s['win_rate_ties_as_losses']:.3f}</td></tr>"
        )
    m = result["macro"]
    rows.append(
        f"<tr><td><b>macro</b></td><td></td><td></td><td></td><td></td><td></td>"
        f"<td class=num><b>{m['win_rate']:.3f}</b></td><td></td>"
        f"<td class=num>{m['win_rate_ties_as_losses']:.3f}</td></tr>"
    )
    skipped = "".join(
        f"<li>{escape(label)}: not compared, {escape(why)}</li>" for label, why in result["skipped"].items()
    )
    return f"<table id=summary>{head}{''.join(rows)}</table>" + (f"<ul>{skipped}</ul>" if skipped else "")


def _pair(i: int, row: PairRow, labels: list[str], names: tuple[str, str]) -> str:
    diffs = " ".join(
        f'data-diff-{k}="{row.scores[label][1] - row.scores[label][0] if label in row.scores else ""}"'
        for k, label in enumerate(labels)
    )
    cells = []
    for label in labels:
        if label not in row.scores:
            cells.append(f"<tr><td>{escape(label)}</td><td colspan=3 class=meta>not scored</td></tr>")
            continue
        sa, sb = row.scores[label]
        mark = "win" if sb > sa else "loss" if sb < sa else ""
        cells.append(
            f"<tr><td>{escape(label)}</td><td class=num>{_num(sa)}</td><td class=num>{_num(sb)}</td>"
            f"<td class='num {mark}'>{sb - sa:+.4f}</td></tr>"
        )
    a, b = (escape(n) for n in names)
    scores = f"<table class=scores><tr><th></th><th>{a}</th><th>{b}</th><th>b − a</th></tr>{''.join(cells)}</table>"
    images = "".join(
        f'<td><img class=pair loading=lazy src="{escape(quote(path))}" alt="{escape(name)}, prompt {escape(str(row.prompt_id))}, '
        f'seed {row.seed}"></td>'
        for path, name in ((row.path_a, names[0]), (row.path_b, names[1]))
    )
    return (
        f'<tr data-order="{i}" {diffs}><td class=prompt>{escape(row.prompt)}'
        f"<div class=meta>prompt {escape(str(row.prompt_id))}, seed {row.seed}</div></td>{images}<td>{scores}</td></tr>"
    )


def render_report(result: dict, rows: list[PairRow], settings: dict[str, dict | None]) -> str:
    labels = list(result["scorers"])
    names = (result["a"], result["b"])
    a, b = (escape(n) for n in names)
    options = '<option value="order">prompt order</option>' + "".join(
        f'<option value="diff-{k}">{escape(label)}: b − a</option>' for k, label in enumerate(labels)
    )
    settings_html = "".join(
        f"<h3>{escape(model)}</h3><pre>{escape(json.dumps(s, indent=2, ensure_ascii=False))}</pre>"
        for model, s in settings.items()
        if s is not None
    )
    body = "".join(_pair(i, row, labels, names) for i, row in enumerate(rows))
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{b} vs {a}</title><style>{STYLE}</style></head><body>"
        f"<h1>{b} (b) against {a} (a)</h1>"
        f"<p>{len(rows)} image pairs (same prompt and seed). Win rate = (wins + ½·ties) / pairs; the interval is a "
        "paired bootstrap's 2.5th to 97.5th percentile.</p>"
        f"{_summary(result)}"
        + (
            f"<details><summary>how the images were made</summary>{settings_html}</details>"
            if settings_html
            else ""
        )
        + f"<div id=controls>Sort by <select id=sort-key>{options}</select> <button id=sort-dir type=button>"
        "largest b − a first</button></div>"
        f"<table id=pairs><thead><tr><th>prompt</th><th>{a}</th><th>{b}</th><th>scores</th></tr></thead>"
        f"<tbody>{body}</tbody></table><script>{SCRIPT}</script></body></html>\n"
    )


def write_report(path: Path, result: dict, rows: list[PairRow], settings: dict[str, dict | None]) -> None:
    atomic_write_bytes(path, render_report(result, rows, settings).encode("utf-8"))
