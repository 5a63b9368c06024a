"""What ``salbench score`` says after a submission landed: where its rows are, its rank per metric
among the board's rows, whether a stored result was re-used, and the regenerated figures."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from salbench.benchmark.results import leaderboards_dir

# board metrics ranked for a submission, and whether higher is better (PROTOCOL §3)
RANKED = (("gini", True), ("ssim_mean", True), ("log10_ros", False), ("aopc", True))


def ranks(board: pd.DataFrame, model_id: str) -> dict[str, dict[str, tuple[int, int]]]:
    """``{method: {metric: (rank, rows)}}`` of ``model_id`` among the board's rows of each method
    (1 = best; a NaN value ranks last). A row with more than 10% NaN ROS images (``ros_ranked``
    false, PROTOCOL §8.2) is not ranked on ROS: it is left out of the ROS ranking, and its own ROS
    rank is ``(0, rows ranked)``.

    >>> df = pd.DataFrame({"id": ["a", "b", "c"], "method": ["VG"] * 3, "gini": [0.5, 0.7, 0.6],
    ...                    "ssim_mean": [0.9, 0.8, 0.7], "log10_ros": [3.0, 2.0, float("nan")], "aopc": [0.1, 0.2, 0.3]})
    >>> ranks(df, "c")["VG"]
    {'gini': (2, 3), 'ssim_mean': (3, 3), 'log10_ros': (3, 3), 'aopc': (1, 3)}
    >>> ranks(df.assign(ros_ranked=[True, False, True]), "b")["VG"]["log10_ros"]  # b: too many NaN images
    (0, 2)
    """
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for method, rows in board.groupby("method", sort=False):
        if model_id not in set(rows["id"]):
            continue
        out[method] = {}
        for metric, higher in RANKED:
            if metric not in rows.columns:
                continue
            pool = rows
            if metric == "log10_ros" and "ros_ranked" in rows.columns:
                pool = rows[rows["ros_ranked"].astype(str).str.lower().isin(("true", "1", "1.0"))]
            order = pool.sort_values(metric, ascending=not higher, na_position="last", kind="stable")["id"].tolist()
            out[method][metric] = ((order.index(model_id) + 1) if model_id in order else 0, len(order))
    return out


def report(dataset: str, card: dict, *, reused: bool, lb_dir: Path | None = None,
           say: Callable[[str], None] = print) -> None:
    """Where the submission's rows went (the board's path and the row id), its ranks per metric,
    and whether its result was re-used."""
    lb = Path(lb_dir or leaderboards_dir())
    path = lb / f"{dataset}.csv"
    board = pd.read_csv(path)
    mine = board[board["id"] == card["id"]]
    say(f"board: {path.resolve()}: {len(mine)} row(s) with id {card['id']} "
        f"(name {card.get('name', '')!r}; methods {', '.join(mine['method'].astype(str)) or 'none'})")
    for method, per in ranks(board, card["id"]).items():
        n = next(iter(per.values()))[1] if per else 0
        say(f"  rank among the {n} {method} rows (1 = best): "
            + ", ".join(f"{metric} {r}/{k}" if r else f"{metric} not ranked (over 10% NaN images)"
                        for metric, (r, k) in per.items()))
    say("result: " + ("a stored result of the same weights and settings was re-used (nothing was scored again)"
                      if reused else "scored now and stored"))


def regenerate_figures(dataset: str, *, lb_dir: Path | None = None, say: Callable[[str], None] = print) -> list[Path]:
    """Redraw the dataset's board figures (headline metrics, SSIM, ROAD) from its board files (a submission gets a colour
    no zoo variant uses, dashed: ``figures._style``); a failure is said, not raised (the
    submission has landed either way)."""
    from salbench.benchmark import figures

    lb = Path(lb_dir or leaderboards_dir())
    out = []
    for fn in figures.BOARD_FIGURES:
        try:
            out.append(fn(dataset, out_dir=lb / "figures", lb_dir=lb))
        except Exception as e:  # a figure is secondary to the stored submission
            say(f"warning: {fn.__name__} for {dataset} failed ({type(e).__name__}: {e}); run `salbench figures "
                f"--dataset {dataset}`")
    if out:
        say("figures: " + ", ".join(str(p) for p in out))
    return out


def site_notice(*, lb_dir: Path | None = None, say: Callable[[str], None] = print) -> None:
    """One line after a submission landed: the static site (``salbench site``) is not redrawn by
    ``score`` (it takes seconds more and draws the new model's gallery), so say that it is stale and
    which command redraws it."""
    site = Path(lb_dir or leaderboards_dir()) / "site" / "index.html"
    if site.is_file():
        say(f"site: {site} is stale (it does not show this submission yet); redraw it with `salbench site`")
    else:
        say(f"site: none yet at {site.parent}; `salbench site` builds it with this submission")
