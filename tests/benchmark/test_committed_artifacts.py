"""The committed artefacts agree with each other and with the data.

- Every committed image set (``benchmark/imagesets/*.json``) verifies against the dataset files
  and the zoo (image-bytes sha256, reference checkpoints), and its reference N/A/G models
  classify every image in it correctly (PROTOCOL §4). Skips where the dataset is absent.
- Every committed leaderboard CSV is exactly what the stored results scored on the committed
  set regenerate, and every zoo model of that dataset has such a result.
"""

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from salbench.metrics.protocol import PROTOCOL_VERSION

from salbench.benchmark.harness import zoo_cards
from salbench.benchmark.imagesets import IMAGESETS_DIR, load_imageset
from salbench.benchmark.leaderboard import leaderboard_tables, write_leaderboard
from salbench.benchmark.results import DEFAULT_LEADERBOARDS_DIR, list_results
from salbench.model_zoo import zoo
from salbench.model_zoo.attacks import natural_accuracy
from salbench.model_zoo.data import DatasetNotFoundError, load_split

SETS = sorted(IMAGESETS_DIR.glob("*.json"))
BOARDS = sorted(p for p in DEFAULT_LEADERBOARDS_DIR.glob("*.csv") if "_" not in p.stem)


@pytest.fixture(autouse=True)
def committed_dirs(monkeypatch):
    """Read the repository's own zoo, image sets and leaderboards whatever the environment says."""
    for var in ("SALBENCH_ZOO_DIR", "SALBENCH_IMAGESETS_DIR", "SALBENCH_LEADERBOARDS_DIR"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("path", SETS, ids=[p.stem for p in SETS])
def test_committed_imageset_verifies_and_is_commonly_correct(path: Path):
    dataset = json.loads(path.read_text())["dataset"]
    try:
        test = load_split(dataset, "test", download=False)
    except DatasetNotFoundError as e:
        pytest.skip(f"{dataset} test split not available here ({str(e).splitlines()[0]})")
    s = load_imageset(dataset, test_split=test)  # raises on changed bytes or reference checkpoints
    assert len(s) == 1000 and s.indices.unique().numel() == 1000
    assert (test.labels[s.indices] == s.labels).all()
    x = s.images.float() / 255
    for variant, ref in s.reference_models.items():
        acc = natural_accuracy(zoo.load(ref["id"]), x, s.labels)
        assert acc == 1.0, f"reference {variant} ({ref['id']}) gets {acc:.4f} on the {dataset} set"


@pytest.mark.parametrize("path", BOARDS, ids=[p.stem for p in BOARDS])
def test_committed_leaderboard_is_regenerated_from_results(path: Path):
    dataset = path.stem
    set_sha = json.loads((IMAGESETS_DIR / f"{dataset}.json").read_text())["images_sha256"]
    results = list_results(dataset, images_sha256=set_sha)
    if not results:  # a dataset awaiting its re-score under a new protocol: allowed only when the README says so
        readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
        name = {"cifar10": "CIFAR-10", "fmnist": "FMNIST"}.get(dataset, dataset)
        assert f"{name} has not been re-scored under protocol {PROTOCOL_VERSION} yet" in readme, (
            f"{path.name} has no rows and the README does not say why")
        assert not path.read_text().strip(), f"{path.name} has rows but no stored {PROTOCOL_VERSION} result"
        pytest.skip(f"{dataset}: not re-scored under protocol {PROTOCOL_VERSION} yet (the README says so)")
    expected = leaderboard_tables(results, stats=False)["main"]
    df = pd.read_csv(path)
    assert list(df["id"]) == list(expected["id"]) and list(df["method"]) == list(expected["method"])
    for col in ("gini", "ssim_mean", "log10_ros", "aopc", "acc_on_set"):
        assert df[col].to_numpy() == pytest.approx(expected[col].to_numpy(), rel=1e-5, nan_ok=True), col
    scored = {r["model"]["sha256"] for r in results}
    missing = [c["id"] for c in zoo_cards(dataset) if c["sha256"] not in scored]
    assert not missing, f"zoo models without a result on the committed {dataset} set: {missing}"


_NUMBER = re.compile(r"[-+]?\d+\.\d+(?:e[-+]?\d+)?|[-+]?\d+e[-+]?\d+")


def _same_up_to_float_rounding(a: str, b: str) -> bool:
    """Equal text once each decimal number is compared to a relative 1e-4 (another BLAS may
    round the last printed digit of a bootstrap bound differently)."""
    if _NUMBER.sub("#", a) != _NUMBER.sub("#", b):
        return False
    xs, ys = _NUMBER.findall(a), _NUMBER.findall(b)
    return all(math.isclose(float(x), float(y), rel_tol=1e-4, abs_tol=1e-9) for x, y in zip(xs, ys))


@pytest.mark.parametrize("path", BOARDS, ids=[p.stem for p in BOARDS])
def test_every_committed_board_file_regenerates_from_the_stored_results(path: Path, tmp_path: Path):
    """All six files of a dataset (intervals, comparisons, seed spread, claims) are a pure,
    deterministic function of the stored results: byte-identical here, equal to float
    rounding on another machine's BLAS."""
    dataset = path.stem
    set_sha = json.loads((IMAGESETS_DIR / f"{dataset}.json").read_text())["images_sha256"]
    written = write_leaderboard(dataset, out_dir=tmp_path, images_sha256=set_sha)
    assert len(written) == 9
    for new in written.values():
        committed = DEFAULT_LEADERBOARDS_DIR / new.name
        assert committed.is_file(), f"{committed.name} is not committed; run `salbench leaderboard --dataset {dataset}`"
        a, b = committed.read_text(), new.read_text()
        assert a == b or _same_up_to_float_rounding(a, b), f"{committed.name} differs from its regeneration"


@pytest.mark.parametrize("dataset, heading_name, marker", [
    ("fmnist", "GLANCE_HEADING", "fmnist-glance"), ("cifar10", "PLACEMENT_HEADING", "cifar10-placement")])
def test_readme_quotes_the_generated_tables(dataset, heading_name, marker):
    """The README's claims table ("At a glance", FMNIST) and its placement table (Table 5, CIFAR-10) are
    those of the committed pattern files (which the test above regenerates from the stored results),
    line for line."""
    from salbench.benchmark import leaderboard as L

    assert (dataset, getattr(L, heading_name), marker) in L.README_QUOTES
    root = Path(__file__).resolve().parents[2]
    table = L.pattern_section_table((DEFAULT_LEADERBOARDS_DIR / f"{dataset}_pattern.md").read_text(),
                                    getattr(L, heading_name))
    quoted = L.readme_quote((root / "README.md").read_text(), marker)
    if not table:
        pytest.skip(f"{dataset}_pattern.md has no {getattr(L, heading_name)!r} section yet")
    assert quoted is not None, f"README lacks the <!-- BEGIN {marker} --> / <!-- END {marker} --> markers"
    assert len(table) > 2
    assert quoted == table, (
        f"README's {marker} table differs from leaderboards/{dataset}_pattern.md: run `make readme-tables`")


def test_readme_quotes_the_bench_ratios():
    """The README's performance table is docs/performance/bench.md's ratios (``make readme-tables``)."""
    from salbench.benchmark import leaderboard as L

    root = Path(__file__).resolve().parents[2]
    table = L.bench_ratio_table((root / "docs" / "performance" / "bench.md").read_text())
    assert len(table) > 5 and table[0] == "| benchmark | ratio | target | met |"
    assert L.readme_quote((root / "README.md").read_text(), "bench-ratios") == table, (
        "README's bench-ratios table differs from docs/performance/bench.md: run `make readme-tables`")


def test_bench_ratio_table_keeps_name_ratio_target_met():
    from salbench.benchmark.leaderboard import bench_ratio_table

    md = ("# x\n| benchmark | SalBench [s] | reference [s] | ratio | target | met | notes |\n|---|---|---|---|---|---|---|\n"
          "| ROAD | 1.5 | 30 | **20.0x** | 20x | yes | a=1 |\n| step | 1 | 0.9 | **0.90x** | 0.909x | **no** |  |\n")
    assert bench_ratio_table(md) == ["| benchmark | ratio | target | met |", "|---|---|---|---|",
                                     "| ROAD | **20.0x** | 20x | yes |", "| step | **0.90x** | 0.909x | **no** |"]
    assert bench_ratio_table("no table") == []


def test_sync_readme_quotes_rewrites_only_the_marked_table(tmp_path):
    from salbench.benchmark.leaderboard import GLANCE_HEADING, sync_readme_quotes

    boards = tmp_path / "boards"
    boards.mkdir()
    (boards / "fmnist_pattern.md").write_text(f"# x\n\n{GLANCE_HEADING}\n\ntext\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n## next\n| z |\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- BEGIN fmnist-glance (copy) -->\n| old |\n<!-- END fmnist-glance -->\nafter | x\n")
    assert sync_readme_quotes(readme, boards) == ["fmnist-glance"]
    assert readme.read_text() == ("intro\n<!-- BEGIN fmnist-glance (copy) -->\n| a | b |\n|---|---|\n| 1 | 2 |\n"
                                  "<!-- END fmnist-glance -->\nafter | x\n")
    assert sync_readme_quotes(readme, boards) == []  # already in sync


def test_metric_cards_are_generated_from_the_committed_boards(tmp_path: Path):
    """docs/metrics/<metric>.md is what `python -m salbench.benchmark.metric_cards` writes from the boards."""
    from salbench.benchmark.metric_cards import DOCS, write_metric_cards

    written = write_metric_cards(out_dir=tmp_path, lb_dir=DEFAULT_LEADERBOARDS_DIR)
    assert {p.name for p in written} == {"gini.md", "ssim_mean.md", "log10_ros.md", "aopc.md"}
    for p in written:
        committed = DOCS / p.name
        assert committed.is_file(), f"docs/metrics/{p.name} is not committed: run `make readme-tables`"
        assert committed.read_text() == p.read_text(), f"docs/metrics/{p.name} is stale: run `make readme-tables`"
