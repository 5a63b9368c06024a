"""Figures: SSIM-vs-σ curves (paper Fig. 5), ROAD curves (Fig. 9) and a saliency-map grid of
the same images for the zoo's models, VG and IG (Fig. 1). PNGs under ``leaderboards/figures/``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from salbench import metrics  # noqa: E402
from salbench.benchmark.results import leaderboards_dir  # noqa: E402


def fig_dir() -> Path:
    return leaderboards_dir() / "figures"

COLORS = {"N": "tab:blue", "A": "tab:orange", "G": "tab:green", "M1": "tab:purple", "M2": "tab:brown"}


def _label(row) -> str:
    return f"{row['variant']} ({row['id']})" if row["variant"] in COLORS else str(row["id"])


def _curves(df: pd.DataFrame, x: str, y: str, title: str, xlabel: str, ylabel: str, path: Path,
            interval: str = "bars") -> Path:
    """One panel per method, one curve per model; ``<y>_lo``/``<y>_hi`` columns (95% bootstrap
    intervals, PROTOCOL §7) drawn as error bars or as a shaded band."""
    methods = list(dict.fromkeys(df["method"]))
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods):
        sub = df[df["method"] == method]
        for mid, g in sub.groupby("id", sort=False):
            v = g["variant"].iloc[0]
            line, = ax.plot(g[x], g[y], marker="o", ms=3, label=_label(g.iloc[0]), color=COLORS.get(v))
            if f"{y}_lo" in g.columns:
                lo, hi = g[f"{y}_lo"].to_numpy(), g[f"{y}_hi"].to_numpy()
                if interval == "band":
                    ax.fill_between(g[x], lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
                else:
                    ax.errorbar(g[x], g[y], yerr=[g[y] - lo, hi - g[y]], fmt="none", ecolor=line.get_color(),
                                capsize=2, lw=0.8)
        ax.set_title(f"{method}: {title}")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7, loc="best", title="bars/bands: 95% bootstrap CI over images",
                       title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ssim_figure(dataset: str, out_dir: Path | None = None, lb_dir: Path | None = None) -> Path:
    df = pd.read_csv((lb_dir or leaderboards_dir()) / f"{dataset}_ssim.csv")
    return _curves(df, "sigma", "ssim", "SSIM of maps under input noise (higher = more stable)", "noise σ",
                   "mean SSIM (kept images)", (out_dir or fig_dir()) / f"{dataset}_ssim.png")


def road_figure(dataset: str, out_dir: Path | None = None, lb_dir: Path | None = None) -> Path:
    df = pd.read_csv((lb_dir or leaderboards_dir()) / f"{dataset}_road.csv")
    return _curves(df, "percent_removed", "accuracy", "ROAD, most relevant first (lower = more faithful)",
                   "% pixels removed (MoRF)", "accuracy", (out_dir or fig_dir()) / f"{dataset}_road.png",
                   interval="band")


def saliency_grid(models: dict[str, torch.nn.Module], imageset, *, n_images: int = 8, out_dir: Path | None = None,
                  ig_steps: int = 50) -> Path:
    """Rows: the input, then VG and IG maps of each model; columns: the same images."""
    step = max(len(imageset) // n_images, 1)
    idx = torch.arange(0, step * n_images, step)[:n_images]
    x = imageset.images[idx].float() / 255
    y = imageset.labels[idx]
    rows = [("input", None, x)]
    for method in ("VG", "IG"):
        for name, model in models.items():
            model.eval()
            if method == "VG":
                maps = metrics.vanilla_gradient(model, x, y)
            else:
                maps = metrics.integrated_gradients(model, x, y, n_steps=ig_steps)
            rows.append((f"{name} {method}", method, maps.detach()))
    fig, axes = plt.subplots(len(rows), n_images, figsize=(1.3 * n_images, 1.35 * len(rows)), squeeze=False)
    for r, (label, method, data) in enumerate(rows):
        for c in range(n_images):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if method is None:
                img = data[c].permute(1, 2, 0).squeeze(-1).numpy()
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            elif method == "VG":
                m = data[c]
                ax.imshow(m.numpy(), cmap="hot", vmin=0, vmax=float(m.max()) or 1.0)
            else:
                m = data[c]
                v = float(m.abs().max()) or 1.0
                ax.imshow(m.numpy(), cmap="bwr", vmin=-v, vmax=v)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(f"{imageset.dataset}: VG (|grad|, hot) and IG (signed, blue-white-red), same images", fontsize=9)
    fig.tight_layout()
    path = (out_dir or fig_dir()) / f"{imageset.dataset}_saliency_grid.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
