"""The static leaderboard site: ``salbench site`` -> ``leaderboards/site/``.

An index and, per dataset with a board (``leaderboards/<dataset>.csv``), three pages: the
board as a sortable table (every metric with its 95% interval from the ``_lo``/``_hi``
columns), the figures and one section per model (its card and its saliency gallery); the
paired comparisons (``<dataset>_comparisons.csv``); the paper's claims (``<dataset>_pattern.md``).

- Self-contained: one stylesheet and a small script for sorting, both local; no CDN, font or
  network request. The figures and CSVs are linked relatively (``../figures/...``), so the site
  opens from disk and from any static host that serves the ``leaderboards/`` folder.
- Deterministic: the pages are a pure function of the files they are built from (no timestamps);
  regenerating gives byte-identical files (a test checks the committed site).
- Every string from a file (submission names and notes are untrusted) is HTML-escaped.

Layout: :func:`collect` reads the files (the only input I/O), :func:`render` turns that data into
``{relative path: bytes}`` without touching the disk, :func:`write_site` writes it atomically.
Per-model saliency galleries (``site/gallery/<id>.png``) are drawn by :func:`refresh_galleries`
(``benchmark.figures.model_gallery``) only when missing or stale (their PNG records what they were
drawn from).
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SITE_DIRNAME = "site"
GALLERY_DIR = "gallery"
GALLERY_IMAGES = 8  # images per gallery (the saliency grid's selection, benchmark.figures.grid_images)
GALLERY_IG_STEPS = 50  # PROTOCOL §2
_OWNED_SUFFIXES = (".html", ".css", ".js", ".png")  # what write_site may remove as stale


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Figure:
    name: str  # file name in the figures folder
    width: int
    height: int


@dataclass(frozen=True)
class DatasetData:
    """Everything the pages of one dataset are built from."""

    name: str
    board: list[dict[str, str]]  # rows of <dataset>.csv, values as written
    comparisons: list[dict[str, str]] = field(default_factory=list)  # rows of <dataset>_comparisons.csv
    pattern_md: str | None = None  # <dataset>_pattern.md
    figures: list[Figure] = field(default_factory=list)
    cards: dict[str, dict] = field(default_factory=dict)  # checkpoint sha256 -> card (zoo or submission)
    galleries: dict[str, Figure] = field(default_factory=dict)  # model id -> its gallery PNG in site/gallery
    files: tuple[str, ...] = ()  # board files present in the leaderboards folder (download links)
    controls: list[dict[str, str]] = field(default_factory=list)  # rows of <dataset>_controls.csv
    gates: list[dict[str, str]] = field(default_factory=list)  # rows of <dataset>_gates.csv


@dataclass(frozen=True)
class SiteData:
    datasets: list[DatasetData]
    lb_href: str = ".."  # the leaderboards folder, relative to the site folder (figures, CSVs)


def png_size(head: bytes) -> tuple[int, int]:
    """(width, height) from the first 24 bytes of a PNG.

    >>> png_size(b"\\x89PNG\\r\\n\\x1a\\n" + b"\\x00\\x00\\x00\\rIHDR" + (640).to_bytes(4, "big") + (480).to_bytes(4, "big"))
    (640, 480)
    """
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"not a PNG file (expected the PNG signature and an IHDR chunk, got {head[:16]!r})")
    return struct.unpack(">II", head[16:24])


def _read_png_size(path: Path) -> tuple[int, int]:
    with open(path, "rb") as f:
        try:
            return png_size(f.read(24))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def anchor(model_id: str) -> str:
    """A stable HTML id / file stem for a model id: letters, digits, ``-`` and ``_`` only (a
    short hash is appended when characters had to be replaced, so two ids never collide).

    >>> anchor("fmnist-lenet-A-paper-10ep")
    'fmnist-lenet-A-paper-10ep'
    >>> anchor('x"><script>')
    'x___script_-c24132c2'
    """
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", model_id)
    if safe != model_id or not safe:
        safe += "-" + hashlib.sha256(model_id.encode()).hexdigest()[:8]
    return safe


FIGURE_ORDER = ("metrics", "ssim", "road", "saliency_grid", "sanity", "tda_top")


def dataset_names(lb_dir: Path) -> list[str]:
    """Datasets with a board in ``lb_dir``: registered datasets in registry order, then others."""
    from salbench.model_zoo.datasets import DatasetNames

    present = {p.stem for p in lb_dir.glob("*.csv") if "_" not in p.stem}
    known = [d for d in DatasetNames() if d in present]
    return known + sorted(present - set(known))


def collect(lb_dir: Path | None = None, *, site_dir: Path | None = None, cards_dir: Path | None = None,
            submissions_dir: Path | None = None) -> SiteData:
    """Read what the site shows: each dataset's board files, the zoo and submission cards, the
    figures (sizes only) and the galleries present in ``site_dir/gallery``."""
    from salbench.benchmark.results import leaderboards_dir
    from salbench.benchmark.submit import list_submission_cards
    from salbench.model_zoo.zoo import list_cards

    lb = Path(lb_dir or leaderboards_dir())
    site = Path(site_dir or lb / SITE_DIRNAME)
    submissions_dir = Path(submissions_dir or lb / "submissions")
    fig_dir = lb / "figures"
    out = []
    for ds in dataset_names(lb):
        board = _read_csv(lb / f"{ds}.csv")
        cmp_path, md_path = lb / f"{ds}_comparisons.csv", lb / f"{ds}_pattern.md"
        ctl_path, gates_path = lb / f"{ds}_controls.csv", lb / f"{ds}_gates.csv"
        figs = sorted(fig_dir.glob(f"{ds}_*.png"),
                      key=lambda p: (_fig_rank(ds, p.name), p.name))
        cards = {c["sha256"]: c for c in list_cards(ds, cards_dir) if c.get("sha256")}
        cards.update({c["sha256"]: c for c in list_submission_cards(ds, submissions_dir)})
        galleries = {}
        for r in board:
            p = site / GALLERY_DIR / f"{anchor(r['id'])}.png"
            if r["id"] not in galleries and p.is_file():
                galleries[r["id"]] = Figure(p.name, *_read_png_size(p))
        out.append(DatasetData(
            name=ds, board=board,
            comparisons=_read_csv(cmp_path) if cmp_path.is_file() else [],
            pattern_md=md_path.read_text(encoding="utf-8") if md_path.is_file() else None,
            figures=[Figure(p.name, *_read_png_size(p)) for p in figs],
            cards=cards, galleries=galleries,
            controls=_read_csv(ctl_path) if ctl_path.is_file() else [],
            gates=_read_csv(gates_path) if gates_path.is_file() else [],
            files=tuple(n for n in (f"{ds}.csv", f"{ds}_comparisons.csv", f"{ds}_ssim.csv", f"{ds}_road.csv",
                                    f"{ds}_variants.csv", f"{ds}_pattern.md", f"{ds}_controls.csv",
                                    f"{ds}_gates.csv", f"{ds}_sanity.csv") if (lb / n).is_file())))
    return SiteData(out, lb_href=Path(os.path.relpath(lb, site)).as_posix())


def _fig_rank(ds: str, name: str) -> int:
    stem = name[len(ds) + 1:-4]
    return FIGURE_ORDER.index(stem) if stem in FIGURE_ORDER else len(FIGURE_ORDER)


# ----------------------------------------------------------------------------- HTML helpers
def esc(value) -> str:
    """HTML-escape any value for text or a quoted attribute.

    >>> esc('<script>alert("x")</script> & co')
    '&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co'
    """
    return html.escape(str(value), quote=True)


def number(text: str | None) -> float | None:
    """A CSV cell as a finite float, or None (empty, ``nan``, ``inf``, not a number).

    >>> number("0.25"), number("nan"), number(""), number("1e-3"), number("abc")
    (0.25, None, None, 0.001, None)
    """
    try:
        x = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class Column:
    key: str  # CSV column
    label: str
    kind: str = "number"  # number | text
    digits: int = 3  # decimals shown (numbers); 0 = integer, -1 = two significant digits
    interval: bool = False  # show [<key>_lo, <key>_hi]
    help: str = ""


MISSING = "\u2013"  # en dash: not measured / undefined


def cell(row: dict[str, str], col: Column) -> str:
    """One ``<td>``: the shown text and a ``data-sort`` key (the CSV's full-precision value, empty
    when missing, so that sorting puts it last).

    >>> cell({"gini": "0.5531", "gini_lo": "0.55", "gini_hi": "0.556"}, Column("gini", "Gini", interval=True))
    '<td data-sort="0.5531">0.553<br><span class="ci">[0.550, 0.556]</span></td>'
    >>> cell({"autoattack_acc": "nan"}, Column("autoattack_acc", "AutoAttack", digits=4))
    '<td data-sort="" class="missing"><span title="not measured">–</span></td>'
    """
    raw = row.get(col.key, "")
    if col.kind == "text":
        return f'<td data-sort="{esc(raw)}" class="text">{esc(raw)}</td>'
    x = number(raw)
    if x is None:
        return f'<td data-sort="" class="missing"><span title="not measured">{MISSING}</span></td>'
    text = _fmt(x, col.digits)
    if col.interval:
        lo, hi = number(row.get(f"{col.key}_lo")), number(row.get(f"{col.key}_hi"))
        if lo is not None and hi is not None:
            text += f'<br><span class="ci">[{_fmt(lo, col.digits)}, {_fmt(hi, col.digits)}]</span>'
    return f'<td data-sort="{esc(raw.strip())}">{text}</td>'


def _fmt(x: float, digits: int) -> str:
    if digits == 0:
        return f"{x:.0f}"
    if digits < 0:
        return f"{x:.2g}"
    return f"{x:.{digits}f}"


def header(col: Column) -> str:
    """A sortable column header: ``th scope=col`` holding a button (keyboard-operable); the
    script sets ``aria-sort`` on the header the table is sorted by."""
    title = f' title="{esc(col.help)}"' if col.help else ""
    return (f'<th scope="col" data-type="{col.kind}"{title}>'
            f'<button type="button">{esc(col.label)}</button></th>')


def table(table_id: str, caption: str, columns: list[Column], rows: list[str]) -> str:
    head = "".join(header(c) for c in columns)
    return (f'<div class="table-wrap"><table id="{esc(table_id)}" class="sortable">\n'
            f"<caption>{caption}</caption>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
            + "\n".join(rows) + "\n</tbody></table></div>")


# ----------------------------------------------------------------------------- pages
SITE_TITLE = "SalBench leaderboards"

BOARD_COLUMNS = [
    Column("method", "method", "text", help="attribution method: VG (vanilla gradient), IG (integrated gradients)"),
    Column("variant", "variant", "text", help="zoo variant: N natural, A adversarial, G A + Gaussian SmoothBlock, "
                                              "M1/M2 mean/median SmoothBlock"),
    Column("gini", "Gini \u2191", interval=True, help="sparsity of the maps (Gini index; higher = sparser)"),
    Column("ssim_mean", "SSIM \u2191", interval=True,
           help="input-side stability: mean SSIM of scale-free maps (each divided by its max |value|) under "
                "Gaussian input noise (higher = more stable)"),
    Column("log10_ros", "log10 ROS \u2193", interval=True,
           help="output-side stability: median over images of per-image log10 relative output stability "
                "(lower = more stable); rows with more than 10% NaN images are not ranked on it"),
    Column("log10_ros_band", "ROS band", digits=3,
           help="numerical band of log10 ROS: the largest change under a one-ulp weight change or float64 (PROTOCOL §8.4)"),
    Column("aopc", "AOPC \u2191", interval=True, help="faithfulness: ROAD-AOPC (higher = more faithful)"),
    Column("log10_mean_ros", "log10 mean ROS", interval=True,
           help="secondary, paper-comparable: log10 of the mean ROS (quantus semantics); ill-conditioned, never "
                "decides a verdict"),
    Column("natural_acc", "natural acc", digits=4, help="accuracy on the whole test split"),
    Column("robust_acc", "PGD acc", digits=4, help="PGD L-inf robust accuracy, first 1000 test images (PROTOCOL §3)"),
    Column("autoattack_acc", "AutoAttack acc", digits=4,
           help="AutoAttack (standard, L-inf) robust accuracy, first 1000 test images; – where not measured"),
    Column("acc_on_set", "acc on set", interval=True, help="accuracy on the fixed image set"),
    Column("ros_nan_fraction", "ROS NaN", interval=True,
           help="fraction of images whose ROS is undefined (every noise sample flipped the prediction)"),
    Column("ros_ranked", "ranked on ROS", "text",
           help="False: more than 10% of the images have no ROS, so the row is shown but not ranked on ROS (PROTOCOL §8.2)"),
    Column("gate", "sanity gate", "text",
           help="pass, or fail with the checks that failed: model-parameter randomisation (MPRT, eMPRT) and data "
                "randomisation (PROTOCOL §9.3); a failing row is marked, never dropped; – where not computed"),
    Column("beaten_by_control", "beaten by a control", "text",
           help="headline metrics on which a model-free control map (random, edge) of the same model scores better "
                "(PROTOCOL §9.1)"),
    Column("seed", "seed", digits=0, help="training seed of a zoo model"),
    Column("preset", "preset", "text", help="training recipe preset"),
    Column("source", "source", "text", help="zoo model or submission"),
    Column("verified", "verified", "text",
           help="True: `salbench verify` re-scored this result and every headline aggregate came out within its band; "
                "the record is bound to the result's content (benchmark/provenance.py)"),
    Column("computed_by", "computed by", "text",
           help="the code that says it computed the result, or imported (a claim; verified is the check)"),
    Column("notes", "notes", "text", help="the submitter's notes"),
]

COMPARISON_COLUMNS = [
    Column("model", "model", "text"),
    Column("reference", "reference", "text"),
    Column("method", "method", "text"),
    Column("metric", "metric", "text"),
    Column("n_paired", "n paired", digits=0, help="images with a value for both models"),
    Column("delta", "difference", digits=4, interval=True,
           help="model - reference, with its paired percentile bootstrap 95% interval"),
    Column("p", "p", digits=-1, help="Wilcoxon signed-rank p"),
    Column("p_holm", "p (Holm)", digits=-1, help="Holm-adjusted over the four headline metrics per (model, reference, method)"),
    Column("band", "band", digits=3, help="the two models' numerical bands summed: a verdict needs |difference| above it"),
    Column("verdict", "verdict", "text", help="better / worse only when the test and the interval agree and the "
                                              "difference exceeds the band (PROTOCOL §7, §8.4)"),
    Column("robustness", "robustness", "text", help="robust: every robustness variant of the metric gives the same "
                                                    "verdict; variant-dependent otherwise (PROTOCOL §8.5)"),
]

FIGURE_ALT = {
    "tda_top": "{ds}: training-data attribution (optional quanda track), for a few test images the training images "
               "that the N, A and G models each attribute the prediction to most",
    "metrics": "{ds}: one panel per headline metric (Gini, SSIM mean, log10 ROS, AOPC and any registered metric), "
               "one bar per model and method with its 95% bootstrap interval",
    "ssim": "{ds}: mean SSIM of each model's saliency maps against the input-noise level sigma, one panel per "
            "method (VG, IG), with 95% bootstrap error bars; lower panels: the fraction of images kept",
    "road": "{ds}: ROAD curves, accuracy on the fixed set against the percentage of most relevant pixels removed, "
            "one curve per model and panel per method, 95% bands, AOPC in the legend",
    "sanity": "{ds}: model-parameter randomisation, one panel per method (VG, IG and the random and edge "
              "controls): the mean Spearman rank correlation of |map| with the original map after each layer, from "
              "the output down, is re-initialised, one curve per variant",
    "saliency_grid": "{ds}: saliency-map grid, eight images of the set (top row) with the VG and IG maps of the "
                     "N, A and G models below",
}


def page(title: str, body: str, *, nav: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<link rel="stylesheet" href="assets/site.css">
<script src="assets/sort.js" defer></script>
</head>
<body>
<a class="skip" href="#main">Skip to content</a>
<header><nav aria-label="site">{nav}</nav></header>
<main id="main">
{body}
</main>
<footer><p>Generated by <code>salbench site</code> from the files in <code>leaderboards/</code>; regenerated by
<code>make run</code>. Numbers follow PROTOCOL.md; intervals are 95% bootstrap intervals over the fixed image set.</p></footer>
</body>
</html>
"""


def _nav(data: SiteData, current: str = "") -> str:
    links = [("index.html", "Home")] + [(f"{d.name}.html", d.name) for d in data.datasets]
    return " ".join(f'<a href="{esc(h)}"{_current(h, current)}>{esc(t)}</a>' for h, t in links)


def _current(href: str, current: str) -> str:
    return ' aria-current="page"' if href == current else ""


def _sub_nav(ds: DatasetData, current: str) -> str:
    links = [(f"{ds.name}.html", "board, figures, models"), (f"{ds.name}_comparisons.html", "paired comparisons"),
             (f"{ds.name}_claims.html", "the paper's claims"), (f"{ds.name}_sanity.html", "controls and sanity")]
    items = "".join(f'<li><a href="{esc(h)}"{_current(h, current)}>{esc(t)}</a></li>' for h, t in links)
    return f'<nav aria-label="{esc(ds.name)} pages"><ul class="subnav">{items}</ul></nav>'


def _model_cell(row: dict[str, str]) -> str:
    mid, name = row.get("id", ""), row.get("name", "")
    shown = f'<a href="#model-{esc(anchor(mid))}">{esc(mid)}</a>'
    if name:
        shown = f'<span class="name">{esc(name)}</span><br>{shown}'
    return f'<th scope="row" data-sort="{esc(name or mid)}">{shown}</th>'


def board_rows(ds: DatasetData) -> list[str]:
    """One ``<tr>`` per row of the board CSV, in the CSV's order (``data-row``: that order, the
    tie-breaker of every sort)."""
    out = []
    for i, r in enumerate(ds.board):
        cls = ' class="submission"' if r.get("source") not in ("zoo", None) else ""
        out.append(f'<tr data-row="{i}"{cls}>' + _model_cell(r) + "".join(cell(r, c) for c in BOARD_COLUMNS) + "</tr>")
    return out


def _unique_models(ds: DatasetData) -> list[dict[str, str]]:
    seen, out = set(), []
    for r in ds.board:
        if r["id"] not in seen:
            seen.add(r["id"])
            out.append(r)
    return out


def _card_facts(card: dict) -> list[tuple[str, str]]:
    """(label, value) pairs shown for a card; the whole card follows as JSON."""
    facts = []
    if card.get("source") == "submission":
        facts += [("name", card.get("name", "")), ("notes", card.get("notes", "")),
                  ("submitted file", card.get("submitted_file", ""))]
    rec = card.get("recipe") or {}
    sm = card.get("smoothing")
    facts += [("architecture", card.get("arch", "")), ("variant", card.get("variant", "")),
              ("preset", card.get("preset", "")),
              ("SmoothBlock", f"{sm.get('filter')} after stage {sm.get('placement')}" if isinstance(sm, dict) else "none"),
              ("parameters", card.get("num_params", ""))]
    for label, key in (("natural accuracy", "natural_accuracy"), ("PGD robust accuracy", "robust_accuracy")):
        v = card.get(key)
        facts.append((label, f"{v:.4f}" if isinstance(v, (int, float)) and math.isfinite(v) else MISSING))
    aa = card.get("autoattack")
    if isinstance(aa, dict) and isinstance(aa.get("robust_accuracy"), (int, float)):
        facts.append(("AutoAttack robust accuracy", f"{aa['robust_accuracy']:.4f} ({aa.get('version', '')}, "
                                                    f"{aa.get('images', '')})"))
    if rec:
        attack = (f", PGD ε {rec.get('attack_eps')} α {rec.get('attack_alpha')} {rec.get('attack_steps')} steps"
                  if rec.get("variant") != "N" and rec.get("attack_steps") else "")
        facts.append(("training", f"{rec.get('optimizer')} lr {rec.get('lr')}, batch {rec.get('batch_size')}, "
                                  f"{rec.get('epochs')} epochs, seed {rec.get('seed')}{attack}"))
    facts += [("weights sha256", card.get("sha256", "")), ("weights file", card.get("weights", ""))]
    if card.get("trainer_commit"):
        facts.append(("trainer commit", card["trainer_commit"]))
    return facts


def model_section(ds: DatasetData, row: dict[str, str]) -> str:
    mid = row["id"]
    card = ds.cards.get(row.get("sha256", ""))
    title = esc(mid) + (f' <span class="name">({esc(row["name"])})</span>' if row.get("name") else "")
    parts = [f'<section class="model" id="model-{esc(anchor(mid))}" aria-labelledby="h-{esc(anchor(mid))}">',
             f'<h3 id="h-{esc(anchor(mid))}">{title}</h3>']
    g = ds.galleries.get(mid)
    if g is not None:
        alt = (f"Saliency gallery of {mid}: {GALLERY_IMAGES} images of the {ds.name} set (top row), their VG maps "
               f"(middle row, |gradient|, hot colours) and IG maps (bottom row, signed, blue-white-red), each map "
               f"scaled by its own maximum")
        parts.append(f'<figure><img src="{GALLERY_DIR}/{esc(g.name)}" width="{g.width}" height="{g.height}" '
                     f'alt="{esc(alt)}"><figcaption>VG and IG maps of {esc(mid)} on the images of the saliency grid; '
                     f"each map scaled by its own maximum.</figcaption></figure>")
    else:
        parts.append("<p>No saliency gallery (drawn by <code>salbench site</code> where the model's weights and the "
                     "dataset are available).</p>")
    if card is None:
        parts.append("<p>No card found for these weights.</p>")
    else:
        facts = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in _card_facts(card))
        parts.append(f'<dl class="card">{facts}</dl>')
        parts.append(f"<details><summary>The whole card (JSON)</summary><pre>{esc(json.dumps(card, indent=1, ensure_ascii=False))}"
                     "</pre></details>")
    parts.append("</section>")
    return "\n".join(parts)


def dataset_page(data: SiteData, ds: DatasetData) -> str:
    lb = data.lb_href
    n_models = len(_unique_models(ds))
    caption = (f"{esc(ds.name)} leaderboard ({esc(ds.name)}.csv): {len(ds.board)} rows, one per model and "
               "attribution method")
    cols = [Column("id", "model", "text", help="zoo id or submission name")] + BOARD_COLUMNS
    body = [f"<h1>{esc(ds.name)}: leaderboard</h1>", _sub_nav(ds, f"{ds.name}.html"),
            f"<p>{n_models} models, {len(ds.board)} rows. Downloads: "
            + ", ".join(f'<a href="{esc(lb)}/{esc(n)}">{esc(n)}</a>' for n in ds.files) + ".</p>",
            "<p>Each value comes with its 95% bootstrap interval [low, high] over the fixed image set; "
            "\u2191 higher is better, \u2193 lower is better. Select a column header to sort (again to reverse); "
            "missing values (\u2013) stay last.</p>",
            table("board", caption, cols, board_rows(ds)),
            _column_help(cols)]
    if ds.figures:
        body.append('<h2 id="figures">Figures</h2>')
        for f in ds.figures:
            stem = f.name[len(ds.name) + 1:-4]
            alt = FIGURE_ALT.get(stem, f"{ds.name} figure {stem}").format(ds=ds.name)
            body.append(f'<figure><img src="{esc(lb)}/figures/{esc(f.name)}" width="{f.width}" height="{f.height}" '
                        f'alt="{esc(alt)}"><figcaption>{esc(f.name)}</figcaption></figure>')
    body.append('<h2 id="models">Models</h2>')
    body += [model_section(ds, r) for r in _unique_models(ds)]
    return page(f"{ds.name} leaderboard - {SITE_TITLE}", "\n".join(body), nav=_nav(data, f"{ds.name}.html"))


def _column_help(cols: list[Column]) -> str:
    items = "".join(f"<dt>{esc(c.label)}</dt><dd>{esc(c.help)}</dd>" for c in cols if c.help)
    return f'<details class="columns"><summary>What the columns mean</summary><dl>{items}</dl></details>'


def comparisons_page(data: SiteData, ds: DatasetData) -> str:
    rows = []
    for i, r in enumerate(ds.comparisons):
        verdict = r.get("verdict", "")
        cls = {"better": "better", "worse": "worse"}.get(verdict, "")
        tds = "".join(cell(r, c) for c in COMPARISON_COLUMNS)
        rows.append(f'<tr data-row="{i}"' + (f' class="{cls}"' if cls else "") + f">{tds}</tr>")
    caption = f"{esc(ds.name)} paired comparisons ({esc(ds.name)}_comparisons.csv): {len(ds.comparisons)} rows"
    body = [f"<h1>{esc(ds.name)}: paired comparisons</h1>", _sub_nav(ds, f"{ds.name}_comparisons.html")]
    if rows:
        body += ["<p>Each row: model minus reference on the same images, with the paired bootstrap 95% interval, "
                 "the Wilcoxon signed-rank p and the Holm-adjusted p; the verdict says better or worse only when the "
                 "test and the interval agree (PROTOCOL §7). Select a column header to sort.</p>",
                 table("comparisons", caption, COMPARISON_COLUMNS, rows), _column_help(COMPARISON_COLUMNS)]
    else:
        body.append("<p>No comparisons yet.</p>")
    return page(f"{ds.name} comparisons - {SITE_TITLE}", "\n".join(body), nav=_nav(data))


def claims_page(data: SiteData, ds: DatasetData) -> str:
    body = [f"<h1>{esc(ds.name)}: the paper's claims</h1>", _sub_nav(ds, f"{ds.name}_claims.html")]
    if ds.pattern_md is None:
        body.append(f"<p>No claims file ({esc(ds.name)}_pattern.md) yet.</p>")
    else:
        body.append(f'<p>Rendered from <a href="{esc(data.lb_href)}/{esc(ds.name)}_pattern.md">'
                    f"{esc(ds.name)}_pattern.md</a>.</p>")
        body.append(markdown(ds.pattern_md, demote=1))
    return page(f"{ds.name} claims - {SITE_TITLE}", "\n".join(body), nav=_nav(data))


def index_page(data: SiteData) -> str:
    items = []
    for ds in data.datasets:
        items.append(
            f'<li><a href="{esc(ds.name)}.html">{esc(ds.name)}</a>: {len(_unique_models(ds))} models, '
            f'{len(ds.board)} rows; <a href="{esc(ds.name)}_comparisons.html">{len(ds.comparisons)} paired comparisons</a>; '
            f'<a href="{esc(ds.name)}_claims.html">the paper\'s claims</a></li>')
    body = [f"<h1>{SITE_TITLE}</h1>",
            "<p>SalBench scores how trustworthy the gradient saliency maps (vanilla gradient, integrated gradients) "
            "of image classifiers are: sparsity (Gini), input-side stability (SSIM under input noise), output-side "
            "stability (relative output stability, ROS) and faithfulness (ROAD-AOPC), each with a 95% bootstrap "
            "interval over a fixed set of 1000 test images, plus paired tests between models.</p>",
            *central_question_html(data),
            "<h2>Boards</h2>",
            "<ul>" + "".join(items) + "</ul>" if items else "<p>No boards yet.</p>",
            "<p>Submit a model with <code>salbench score</code> (see the README); <code>make run</code> regenerates "
            "the boards and this site.</p>"]
    return page(SITE_TITLE, "\n".join(body), nav=_nav(data, "index.html"))


CENTRAL_HEADING = "## Does smoothing make A's maps more trustworthy?"  # = leaderboard.CENTRAL_HEADING (tests keep them equal)


def central_question_html(data: SiteData) -> list[str]:
    """The paper's central question, answered at the seed level: the generated section of each
    dataset's pattern file (``leaderboard.central_question``), rendered."""
    out = []
    for ds in data.datasets:
        md = ds.pattern_md or ""
        if CENTRAL_HEADING not in md:
            continue
        section = md.split(CENTRAL_HEADING, 1)[1].split("\n## ", 1)[0]
        # rendered one level down from an h1 of its own, so its table gets the heading as its caption
        out.append(markdown(f"# {ds.name}: does smoothing make A's maps more trustworthy?\n\n{section.strip()}",
                            demote=1))
        out.append(f'<p>Per claim and method with every seed: <a href="{esc(ds.name)}_claims.html">the claims page</a>.</p>')
    return out


# ----------------------------------------------------------------------------- markdown (the claims files)
_INLINE = re.compile(r"`([^`]+)`|\*\*(.+?)\*\*")


def inline_md(text: str) -> str:
    """Escape ``text``, then render `code` and **bold**.

    >>> inline_md("**holds** for `a<b>`")
    '<strong>holds</strong> for <code>a&lt;b&gt;</code>'
    """
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(esc(text[pos:m.start()]))
        out.append(f"<code>{esc(m.group(1))}</code>" if m.group(1) is not None
                   else f"<strong>{inline_md(m.group(2))}</strong>")
        pos = m.end()
    out.append(esc(text[pos:]))
    return "".join(out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown(md: str, *, demote: int = 0) -> str:
    """The small Markdown subset of the claims files: ``#`` headings, pipe tables (``<br>`` inside
    a cell is the one raw tag kept), paragraphs, `code` and **bold**. Everything else is text,
    escaped.

    >>> markdown("## A <b>\\n\\n| x | y |\\n|---|---|\\n| 1<br>2 | **ok** |")
    '<h2>A &lt;b&gt;</h2>\\n<table class="md"><thead><tr><th scope="col">x</th><th scope="col">y</th></tr></thead><tbody><tr><td>1<br>2</td><td><strong>ok</strong></td></tr></tbody></table>'
    """
    blocks, para, lines = [], [], md.splitlines()
    last_heading = ""

    def flush():
        if para:
            blocks.append("<p>" + inline_md(" ".join(para)) + "</p>")
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            flush()
            level = min(len(m.group(1)) + demote, 6)
            last_heading = m.group(2)
            blocks.append(f"<h{level}>{inline_md(m.group(2))}</h{level}>")
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|?\s*:?-{3,}", lines[i + 1]):
            flush()
            head = "".join(f'<th scope="col">{inline_md(c)}</th>' for c in _cells(line))
            body_rows = []
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                tds = "".join("<td>" + "<br>".join(inline_md(part) for part in c.split("<br>")) + "</td>"
                              for c in _cells(lines[i]))
                body_rows.append(f"<tr>{tds}</tr>")
                i += 1
            caption = f"<caption>{inline_md(last_heading)}</caption>" if last_heading and demote else ""
            blocks.append(f'<table class="md">{caption}<thead><tr>{head}</tr></thead><tbody>{"".join(body_rows)}'
                          "</tbody></table>")
            continue
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
        i += 1
    flush()
    return "\n".join(blocks)


# ----------------------------------------------------------------------------- assets
ASSETS_DIR = Path(__file__).resolve().parent / "site_assets"


CONTROL_COLUMNS = [
    Column("method", "control", "text", help="random: a seeded uniform map per image; edge: Sobel magnitude of the input"),
    Column("gini", "Gini \u2191", help="sparsity of the control map"),
    Column("ssim_mean", "SSIM \u2191", help="scale-free SSIM under Gaussian input noise, mean over sigma"),
    Column("log10_ros", "log10 ROS \u2193", help="median per-image log10 relative output stability"),
    Column("aopc", "AOPC \u2191", help="ROAD-AOPC of the control map"),
]

GATE_COLUMNS = [
    Column("method", "method", "text"),
    Column("mprt_spearman", "MPRT Spearman", digits=3,
           help="mean Spearman rank correlation of |map| between the model and the model with every layer randomised "
                "(top-down cascade); the gate needs it below the threshold"),
    Column("mprt_ssim", "MPRT SSIM", digits=3, help="mean scale-free SSIM between the same two maps"),
    Column("smprt_spearman", "sMPRT Spearman", digits=3,
           help="as MPRT with each map averaged over noisy copies of the input (Hedstrom et al. 2024)"),
    Column("emprt", "eMPRT", digits=3,
           help="relative rise of the map's discrete entropy from the model to the fully randomised model "
                "(Hedstrom et al. 2024; quantus EfficientMPRT); the gate needs it above 0"),
    Column("data_spearman", "data-randomisation Spearman", digits=3,
           help="mean Spearman of |map| between the reference N model and the N model trained on permuted labels"),
    Column("gate", "gate", "text", help="pass, or fail with the checks that failed"),
]


def sanity_page(data: SiteData, ds: DatasetData) -> str:
    """The control explainers' rows (``<dataset>_controls.csv``) and the sanity gates (``<dataset>_gates.csv``)."""
    body = [f"<h1>{esc(ds.name)}: controls and sanity gates</h1>", _sub_nav(ds, f"{ds.name}_sanity.html"),
            "<p>Controls are maps that ignore the model, scored with every metric like VG and IG (PROTOCOL §9.1): "
            "a metric on which a control scores as well as VG or IG measures something a map can have without "
            "the model (the board's <em>beaten by a control</em> column). The sanity gates (PROTOCOL §9.3) check "
            "that each explanation changes when the model's parameters or its training labels are randomised; "
            "a row that fails is marked on the board, never dropped.</p>"]
    for key, title, cols, rows in (("controls", "Control explainers", CONTROL_COLUMNS, ds.controls),
                                   ("gates", "Sanity gates", GATE_COLUMNS, ds.gates)):
        body.append(f'<h2 id="{key}">{esc(title)}</h2>')
        if not rows:
            body.append(f"<p>No {esc(ds.name)}_{key}.csv yet.</p>")
            continue
        trs = [f'<tr data-row="{i}"><th scope="row" data-sort="{esc(r.get("id", ""))}">'
               f'<a href="{esc(ds.name)}.html#model-{esc(anchor(r.get("id", "")))}">{esc(r.get("id", ""))}</a></th>'
               + "".join(cell(r, c) for c in cols) + "</tr>" for i, r in enumerate(rows)]
        caption = f"{esc(ds.name)} {esc(key)} ({esc(ds.name)}_{esc(key)}.csv): {len(rows)} rows"
        body += [table(key, caption, [Column("id", "model", "text")] + cols, trs), _column_help(cols)]
    return page(f"{ds.name} controls and sanity - {SITE_TITLE}", "\n".join(body), nav=_nav(data))


def render(data: SiteData) -> dict[str, bytes]:
    """Every file of the site except the gallery PNGs, as ``{path relative to the site: bytes}``."""
    files = {"index.html": index_page(data)}
    for ds in data.datasets:
        files[f"{ds.name}.html"] = dataset_page(data, ds)
        files[f"{ds.name}_comparisons.html"] = comparisons_page(data, ds)
        files[f"{ds.name}_claims.html"] = claims_page(data, ds)
        files[f"{ds.name}_sanity.html"] = sanity_page(data, ds)
    out = {k: v.encode("utf-8") for k, v in files.items()}
    for name in ("site.css", "sort.js"):
        out[f"assets/{name}"] = (ASSETS_DIR / name).read_bytes()
    return out


def gallery_paths(data: SiteData) -> set[str]:
    return {f"{GALLERY_DIR}/{g.name}" for ds in data.datasets for g in ds.galleries.values()}


def write_site(files: dict[str, bytes], out_dir: Path, *, keep: set[str] = frozenset()) -> list[str]:
    """Write ``files`` under ``out_dir`` (atomically, each file only if its bytes changed) and
    remove the site's own kinds of files (html, css, js, png) that are neither written nor in
    ``keep``. Returns the relative paths written."""
    from salbench.model_zoo.zoo import atomic_write_bytes

    out_dir = Path(out_dir)
    for rel in files:
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise ValueError(f"site file {rel!r} is not a path inside the site folder")
    written = []
    for rel, data in sorted(files.items()):
        p = out_dir / rel
        if not (p.is_file() and p.read_bytes() == data):
            atomic_write_bytes(p, data)
            written.append(rel)
    if out_dir.is_dir():
        for p in sorted(out_dir.rglob("*")):
            rel = p.relative_to(out_dir).as_posix()
            if p.is_file() and p.suffix in _OWNED_SUFFIXES and rel not in files and rel not in keep:
                p.unlink()
    return written


def site_size(out_dir: Path) -> tuple[int, int]:
    """(files, bytes) under ``out_dir``."""
    sizes = [p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file()]
    return len(sizes), sum(sizes)


# ----------------------------------------------------------------------------- galleries (model loading)
def refresh_galleries(lb_dir: Path | None = None, *, site_dir: Path | None = None, cards_dir: Path | None = None,
                      submissions_dir: Path | None = None, force: bool = False,
                      say: Callable[[str], None] = print) -> list[Path]:
    """Draw the saliency gallery of every model on a board whose gallery is missing or was drawn
    from other weights or another image set (``benchmark.figures.gallery_key``), or all with
    ``force``. A dataset whose files are not here, or a model whose weights cannot be loaded
    (unknown submission format, weights that differ from their card) is skipped with a message;
    its existing gallery is kept."""
    from salbench.benchmark import figures as F
    from salbench.benchmark.imagesets import load_imageset
    from salbench.model_zoo.data import DatasetNotFoundError

    from salbench.benchmark.results import leaderboards_dir

    lb = Path(lb_dir or leaderboards_dir())
    site = Path(site_dir or lb / SITE_DIRNAME)
    submissions_dir = Path(submissions_dir or lb / "submissions")
    data = collect(lb, site_dir=site, cards_dir=cards_dir, submissions_dir=submissions_dir)
    drawn = []
    for ds in data.datasets:
        imageset = None
        for row in _unique_models(ds):
            card = ds.cards.get(row.get("sha256", ""))
            if card is None:
                say(f"gallery of {row['id']}: no card for its weights; skipped")
                continue
            path = site / GALLERY_DIR / f"{anchor(row['id'])}.png"
            if imageset is None:
                try:
                    imageset = load_imageset(ds.name)
                except (DatasetNotFoundError, FileNotFoundError, ValueError) as e:
                    say(f"galleries of {ds.name}: skipped, the image set cannot be loaded here "
                        f"({str(e).splitlines()[0]})")
                    break
            key = F.gallery_key(card["sha256"], imageset.images_sha256, n_images=GALLERY_IMAGES,
                                ig_steps=GALLERY_IG_STEPS)
            if not force and F.gallery_is_current(path, key):
                continue
            try:
                model = _load_model(card, submissions_dir, cards_dir)
            except ValueError as e:  # CheckpointError, or weights that do not match their card
                say(f"gallery of {row['id']}: {e}; skipped")
                continue
            if model is None:
                say(f"gallery of {row['id']}: its weights ({card.get('weights')}) cannot be loaded here; skipped")
                continue
            F.model_gallery(model, imageset, path, key=key, n_images=GALLERY_IMAGES, ig_steps=GALLERY_IG_STEPS,
                            title=f"{ds.name} {row['id']}: inputs, VG (|grad|) and IG (signed); "
                                  "each map scaled by its own maximum")
            drawn.append(path)
            say(f"drew {path}")
    return drawn


def _load_model(card: dict, submissions_dir: Path, cards_dir: Path | None = None):
    """The model of a zoo or submission card, weights verified against the card's sha256 and read
    without running code from the file (registry weights with the card's smoothing and
    normalisation, or an exported ``.pt2`` program: ``benchmark.submit.load_submission``)."""
    from salbench.benchmark.submit import load_submission
    from salbench.model_zoo import zoo

    if card.get("source") == "zoo":
        return zoo.load(card["id"], cards_dir=cards_dir)
    return load_submission(card, Path(submissions_dir))


def build_site(lb_dir: Path | None = None, *, site_dir: Path | None = None, cards_dir: Path | None = None,
               submissions_dir: Path | None = None) -> tuple[Path, list[str]]:
    """Collect, render and write the site (galleries as they are). Returns (site folder, files written)."""
    from salbench.benchmark.results import leaderboards_dir

    lb = Path(lb_dir or leaderboards_dir())
    site = Path(site_dir or lb / SITE_DIRNAME)
    data = collect(lb, site_dir=site, cards_dir=cards_dir, submissions_dir=submissions_dir)
    return site, write_site(render(data), site, keep=gallery_paths(data))


__all__ = ["collect", "render", "write_site", "build_site", "refresh_galleries", "markdown", "esc", "anchor"]
