"""The static leaderboard site (benchmark/site.py) without a browser: the committed site is
exactly what its inputs regenerate, untrusted strings are escaped, nothing refers outside the
site, every image has alt text, the writer is atomic and removes only stale site files."""

from __future__ import annotations

import csv
import io
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from salbench.benchmark import site as W
from salbench.benchmark.cli import main
from salbench.benchmark.results import DEFAULT_LEADERBOARDS_DIR

SITE = DEFAULT_LEADERBOARDS_DIR / W.SITE_DIRNAME
BOARDS = sorted(p.stem for p in DEFAULT_LEADERBOARDS_DIR.glob("*.csv") if "_" not in p.stem)
EVIL_NOTE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> & "quotes"'
EVIL_NAME = '"><svg onload=alert(1)>'


@pytest.fixture(autouse=True)
def committed_dirs(monkeypatch):
    for var in ("SALBENCH_ZOO_DIR", "SALBENCH_IMAGESETS_DIR", "SALBENCH_LEADERBOARDS_DIR"):
        monkeypatch.delenv(var, raising=False)


def _site_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_committed_site_is_exactly_its_regeneration():
    """Byte for byte, file for file: `salbench site` on the committed inputs rewrites nothing."""
    assert SITE.is_dir(), "leaderboards/site is not committed; run `salbench site`"
    data = W.collect()
    fresh = W.render(data)
    committed = _site_files(SITE)
    galleries = W.gallery_paths(data)
    assert set(committed) == set(fresh) | galleries, "files differ: run `salbench site`"
    for rel, b in fresh.items():
        assert committed[rel] == b, f"{rel} differs from its regeneration; run `salbench site`"
    assert W.render(W.collect()) == fresh  # deterministic: no time, no dict-order accident


@pytest.mark.parametrize("dataset", BOARDS)
def test_every_board_model_has_a_gallery_and_a_card(dataset):
    ds = next(d for d in W.collect().datasets if d.name == dataset)
    ids = {r["id"] for r in ds.board}
    assert set(ds.galleries) == ids, f"models without a gallery: {ids - set(ds.galleries)}; run `salbench site`"
    assert all(r["sha256"] in ds.cards for r in ds.board)


class _Table(HTMLParser):
    """The header labels and, per body row, each cell's ``data-sort`` and text of one table."""

    def __init__(self, table_id: str):
        super().__init__()
        self.id, self.inside, self.headers, self.rows, self._cell = table_id, False, [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.inside = a.get("id") == self.id
        elif self.inside and tag == "tr" and "data-row" in a:
            self.rows.append([])
        elif self.inside and tag in ("td", "th"):
            self._cell = [a.get("data-sort"), ""]
            self._in_head = not self.rows or a.get("scope") == "col"

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False
        elif self.inside and tag in ("td", "th") and self._cell is not None:
            if self._in_head:
                self.headers.append(self._cell[1].strip())
            else:
                self.rows[-1].append(tuple(self._cell))
            self._cell = None


def parse_table(page: str, table_id: str) -> _Table:
    t = _Table(table_id)
    t.feed(page)
    return t


def test_board_table_has_one_row_per_csv_row_with_the_csv_values():
    for ds in W.collect().datasets:
        t = parse_table(W.render(W.SiteData([ds]))[f"{ds.name}.html"].decode(), "board")
        with open(DEFAULT_LEADERBOARDS_DIR / f"{ds.name}.csv", newline="") as f:
            csv_rows = list(csv.DictReader(f))
        if not csv_rows:  # a dataset awaiting its re-score under a new protocol (test_committed_artifacts checks why)
            assert t.rows == []
            continue
        assert len(t.rows) == len(csv_rows) > 0
        assert t.headers[:6] == ["model", "method", "variant", "Gini \u2191", "SSIM \u2191", "log10 ROS \u2193"]
        for cells, r in zip(t.rows, csv_rows):
            by = dict(zip(t.headers, cells))
            assert by["model"][1] == r["id"] and by["method"][1] == r["method"]
            # the sort key is the CSV's own string; the text: 3 decimals and the interval
            assert by["Gini \u2191"] == (r["gini"], f'{float(r["gini"]):.3f}[{float(r["gini_lo"]):.3f}, '
                                                    f'{float(r["gini_hi"]):.3f}]')
            assert by["log10 ROS \u2193"][0] == r["log10_ros"]
            aa = r["autoattack_acc"]  # empty or nan where not measured
            assert by["AutoAttack acc"] == (("", "\u2013") if aa in ("", "nan") else (aa, f"{float(aa):.4f}"))


def _board_with_evil_submission(tmp_path: Path) -> Path:
    """A leaderboards folder holding the committed fmnist board plus a submission row whose name
    and notes carry markup, and that submission's card."""
    lb = tmp_path / "leaderboards"
    (lb / "figures").mkdir(parents=True)
    for name in ("fmnist.csv", "fmnist_comparisons.csv", "fmnist_pattern.md"):
        shutil.copy(DEFAULT_LEADERBOARDS_DIR / name, lb / name)
    for f in (DEFAULT_LEADERBOARDS_DIR / "figures").glob("fmnist_*.png"):
        shutil.copy(f, lb / "figures" / f.name)
    with open(lb / "fmnist.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    evil = dict(rows[0], id="fmnist-sub-evil", source="submission", variant="", seed="", name=EVIL_NAME,
                notes=EVIL_NOTE, sha256="e" * 64, gini="0.9", gini_lo="nan", gini_hi="nan", autoattack_acc="")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows + [evil])
    (lb / "fmnist.csv").write_text(buf.getvalue())
    sub = lb / "submissions" / "fmnist"
    sub.mkdir(parents=True)
    import json

    (sub / "fmnist-sub-evil.json").write_text(json.dumps({
        "id": "fmnist-sub-evil", "dataset": "fmnist", "arch": "lenet", "sha256": "e" * 64, "source": "submission",
        "name": EVIL_NAME, "notes": EVIL_NOTE, "weights": "x</script>.safetensors", "submitted_file": "<b>f</b>.pt"}))
    return lb


def test_untrusted_names_and_notes_are_escaped(tmp_path):
    lb = _board_with_evil_submission(tmp_path)
    data = W.collect(lb, submissions_dir=lb / "submissions")
    html_ = W.render(data)["fmnist.html"].decode()
    assert "<script>window" not in html_ and "<img src=x" not in html_ and "<svg" not in html_
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;&lt;img src=x onerror=&quot;window.__pwned = 2&quot;&gt;" in html_
    assert W.esc(EVIL_NAME) in html_ and "x&lt;/script&gt;.safetensors" in html_
    # the only <script> is the site's own, and no attribute value of ours opens a tag
    assert re.findall(r"<script\b[^>]*>", html_) == ['<script src="assets/sort.js" defer>']
    assert re.findall(r"<(?:img|svg)\b[^>]*\bon\w+=", html_) == []


def test_no_reference_leaves_the_site_and_every_image_has_alt_text():
    files = W.render(W.collect())
    for rel, b in files.items():
        text = b.decode()
        assert "://" not in re.sub(r"(?s)<pre>.*?</pre>", "", text) or rel.endswith(".css"), rel
        assert not re.search(r"@import|url\(", text), rel
        if not rel.endswith(".html"):
            continue
        assert text.startswith('<!DOCTYPE html>\n<html lang="en">'), rel
        for ref in re.findall(r'(?:src|href)="([^"]*)"', text):
            assert not re.match(r"[a-z]+:|//", ref), f"{rel} refers outside: {ref}"
        imgs = re.findall(r"<img\b[^>]*>", text)
        assert all(re.search(r'alt="[^"]{20,}"', i) for i in imgs), rel
        for t in re.findall(r"<table\b.*?</table>", text, flags=re.S):
            assert "<caption>" in t, rel
            assert all('scope="' in th for th in re.findall(r"<th\b[^>]*>", t)), rel
    assert len(files["assets/sort.js"]) < 4096


def test_markdown_claims_render_tables_with_captions_and_escape():
    md = W.markdown("# t\n\n## preset `p<1>`\n\n| a | b |\n|---|---|\n| **x** | 1<br>2 <i> |\n\ntext *not* html <b>",
                    demote=1)
    assert "<h2>t</h2>" in md and "<h3>preset <code>p&lt;1&gt;</code></h3>" in md
    assert "<caption>preset <code>p&lt;1&gt;</code></caption>" in md
    assert "<td><strong>x</strong></td><td>1<br>2 &lt;i&gt;</td>" in md
    assert "<p>text *not* html &lt;b&gt;</p>" in md


def test_write_site_is_atomic_rewrites_only_changes_and_removes_only_stale_site_files(tmp_path):
    out = tmp_path / "site"
    assert W.write_site({"a.html": b"1", "assets/x.js": b"2"}, out) == ["a.html", "assets/x.js"]
    (out / "gallery").mkdir()
    (out / "gallery" / "m.png").write_bytes(b"png")
    (out / "CNAME").write_text("example.org")  # not a kind of file the site writes: left alone
    (out / "old.html").write_text("stale")
    mtime = (out / "a.html").stat().st_mtime_ns
    assert W.write_site({"a.html": b"1", "assets/x.js": b"3"}, out, keep={"gallery/m.png"}) == ["assets/x.js"]
    assert (out / "a.html").stat().st_mtime_ns == mtime
    assert sorted(_site_files(out)) == ["CNAME", "a.html", "assets/x.js", "gallery/m.png"]
    assert not list(out.rglob("*.tmp"))
    with pytest.raises(ValueError, match="inside the site folder"):
        W.write_site({"../escape.html": b""}, out)


def test_cli_site_writes_the_site_of_a_leaderboards_folder(tmp_path, monkeypatch, capsys):
    lb = _board_with_evil_submission(tmp_path)
    monkeypatch.setenv("SALBENCH_LEADERBOARDS_DIR", str(lb))
    assert main(["site", "--no-galleries"]) == 0
    out = capsys.readouterr().out
    assert "index.html" in out and "KiB" in out
    files = _site_files(lb / "site")
    assert {"index.html", "fmnist.html", "fmnist_comparisons.html", "fmnist_claims.html", "assets/sort.js"} <= set(files)
    assert main(["site", "--no-galleries"]) == 0 and "0 rewritten" in capsys.readouterr().out


def test_gallery_redraw_reproduces_the_committed_one():
    """The committed FMNIST N gallery is what drawing it again gives (pixels; the PNG records its key)."""
    np = pytest.importorskip("numpy")
    from PIL import Image

    from salbench.benchmark import figures as F
    from salbench.benchmark.imagesets import load_imageset
    from salbench.model_zoo import zoo
    from salbench.model_zoo.data import DatasetNotFoundError

    try:
        imageset = load_imageset("fmnist")
    except DatasetNotFoundError as e:
        pytest.skip(f"FMNIST not available: {e}")
    mid = "fmnist-lenet-N-paper-10ep"
    committed = SITE / W.GALLERY_DIR / f"{mid}.png"
    key = F.gallery_key(zoo.get_card(mid)["sha256"], imageset.images_sha256, n_images=W.GALLERY_IMAGES,
                        ig_steps=W.GALLERY_IG_STEPS)
    assert F.gallery_is_current(committed, key) and not F.gallery_is_current(committed, key + " other")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = F.model_gallery(zoo.load(mid), imageset, Path(d) / "g.png", key=key, n_images=W.GALLERY_IMAGES,
                            ig_steps=W.GALLERY_IG_STEPS,
                            title=f"fmnist {mid}: inputs, VG (|grad|) and IG (signed); each map scaled by its own maximum")
        a = np.asarray(Image.open(p).convert("RGB"), dtype=int)
    b = np.asarray(Image.open(committed).convert("RGB"), dtype=int)
    assert a.shape == b.shape
    # identical here; another BLAS may move a few map values across a colour boundary
    assert (np.abs(a - b).max(axis=2) > 8).mean() < 0.005


def test_refresh_galleries_draws_only_missing_or_stale_ones(tmp_path):
    from salbench.benchmark.imagesets import load_imageset
    from salbench.model_zoo.data import DatasetNotFoundError

    try:
        load_imageset("fmnist")
    except DatasetNotFoundError as e:
        pytest.skip(f"FMNIST not available: {e}")
    lb = tmp_path / "leaderboards"
    lb.mkdir()
    for name in ("fmnist.csv", "fmnist_comparisons.csv"):
        shutil.copy(DEFAULT_LEADERBOARDS_DIR / name, lb / name)
    site = lb / "site"
    shutil.copytree(SITE / W.GALLERY_DIR, site / W.GALLERY_DIR, ignore=shutil.ignore_patterns("cifar10-*"))
    said: list[str] = []
    assert W.refresh_galleries(lb, say=said.append) == [] and said == []  # all current: no model loaded
    stale = site / W.GALLERY_DIR / "fmnist-lenet-G-paper-10ep.png"
    shutil.copy(site / W.GALLERY_DIR / "fmnist-lenet-A-paper-10ep.png", stale)  # another model's key
    (site / W.GALLERY_DIR / "fmnist-lenet-N-paper-10ep.png").unlink()
    drawn = W.refresh_galleries(lb, say=said.append)
    assert sorted(p.name for p in drawn) == ["fmnist-lenet-G-paper-10ep.png", "fmnist-lenet-N-paper-10ep.png"]
    from PIL import Image

    def key(p):
        with Image.open(p) as im:
            return im.text["Description"]

    assert key(stale) == key(SITE / W.GALLERY_DIR / stale.name) != key(SITE / W.GALLERY_DIR / "fmnist-lenet-A-paper-10ep.png")


def test_a_submission_gets_a_gallery_and_its_weights_are_verified(tmp_path):
    """A submitted safetensors file (registry architecture) is drawn from the submissions folder
    after its sha256 is checked against its card; a file that does not match is an error."""
    import json

    import torch
    from safetensors.torch import save_file

    from salbench.benchmark.imagesets import load_imageset
    from salbench.model_zoo import zoo
    from salbench.model_zoo.data import DatasetNotFoundError

    try:
        load_imageset("fmnist")
    except DatasetNotFoundError as e:
        pytest.skip(f"FMNIST not available: {e}")
    sd = {k: v.clone() for k, v in zoo.load("fmnist-lenet-N-paper-10ep").state_dict().items()}
    next(v for k, v in sd.items() if k.endswith("bias")).mul_(1.001)  # other weights than the zoo's
    lb = tmp_path / "leaderboards"
    sub = lb / "submissions" / "fmnist"
    sub.mkdir(parents=True)
    save_file(sd, str(sub / "mine.safetensors"))
    sha = zoo.sha256_file(sub / "mine.safetensors")
    card = {"id": "fmnist-sub-mine", "dataset": "fmnist", "arch": "lenet", "sha256": sha, "source": "submission",
            "num_classes": 10, "smoothing": None, "weights": "mine.safetensors", "name": "mine", "notes": ""}
    (sub / "fmnist-sub-mine.json").write_text(json.dumps(card))
    with open(DEFAULT_LEADERBOARDS_DIR / "fmnist.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:2]
    for r in rows:
        r.update(id="fmnist-sub-mine", source="submission", sha256=sha, name="mine")
    with open(lb / "fmnist.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    said: list[str] = []
    drawn = W.refresh_galleries(lb, say=said.append)
    assert [p.name for p in drawn] == ["fmnist-sub-mine.png"], said
    site, _ = W.build_site(lb)
    page = (site / "fmnist.html").read_text()
    assert 'src="gallery/fmnist-sub-mine.png"' in page and "Saliency gallery of fmnist-sub-mine" in page
    torch.manual_seed(0)
    sd[next(iter(sd))].add_(1.0)
    save_file(sd, str(sub / "mine.safetensors"))  # the file no longer matches its card
    said.clear()
    assert W.refresh_galleries(lb, force=True, say=said.append) == []
    assert len(said) == 1 and "does not match the sha256 on the card of fmnist-sub-mine; skipped" in said[0]
    assert (site / "gallery" / "fmnist-sub-mine.png").is_file()  # the old gallery is kept
