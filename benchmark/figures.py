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
from salbench.model_zoo.datasets import SpecView  # noqa: E402


def fig_dir() -> Path:
    return leaderboards_dir() / "figures"

COLORS = {"N": "tab:blue", "A": "tab:orange", "G": "tab:green", "M1": "tab:purple", "M2": "tab:brown"}
# models that are not one of the zoo's variants (submissions, other seeds/placements): colours
# no variant uses, assigned in order of appearance, with a dashed line
_OTHER_COLORS = ("tab:red", "tab:pink", "tab:olive", "tab:cyan", "tab:gray", "gold", "navy", "lime")
CLASS_NAMES = SpecView("class_names")


def _style(ids_variants: list[tuple[str, str]]) -> dict[str, dict]:
    """id -> line style: a zoo variant's colour for the first model of each variant, distinct
    colours (dashed) for everything else, so a submission never looks like N or A."""
    out, used, k = {}, set(), 0
    for mid, v in ids_variants:
        if mid in out:
            continue
        if v in COLORS and v not in used:
            out[mid] = {"color": COLORS[v], "ls": "-"}
            used.add(v)
        else:
            out[mid] = {"color": _OTHER_COLORS[k % len(_OTHER_COLORS)], "ls": "--"}
            k += 1
    return out


def _label(row, extra: str = "") -> str:
    base = f"{row['variant']} ({row['id']})" if row["variant"] in COLORS else str(row["id"])
    return base + extra


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _curves(df: pd.DataFrame, x: str, y: str, title: str, xlabel: str, ylabel: str, path: Path,
            interval: str = "bars", labels: dict | None = None, caption: str = "", kept: bool = False,
            legend_title: str = "bars/bands: 95% bootstrap CI over images") -> Path:
    """One panel per method, one curve per model; ``<y>_lo``/``<y>_hi`` columns (95% bootstrap
    intervals, PROTOCOL §7) drawn as error bars or as a shaded band. ``kept``: a second row of
    panels with the SSIM kept fraction."""
    methods = list(dict.fromkeys(df["method"]))
    style = _style(list(zip(df["id"], df["variant"])))
    nrows = 2 if kept else 1
    fig, axes = plt.subplots(nrows, len(methods), figsize=(5.5 * len(methods), 4 + 2.6 * (nrows - 1)), squeeze=False,
                             sharex=True, gridspec_kw={"height_ratios": [3, 1.6][:nrows]})
    for col, method in enumerate(methods):
        ax = axes[0][col]
        sub = df[df["method"] == method]
        for mid, g in sub.groupby("id", sort=False):
            st = style[mid]
            extra = (labels or {}).get((mid, method), "")
            ax.plot(g[x], g[y], marker="o", ms=3, label=_label(g.iloc[0], extra), color=st["color"], ls=st["ls"])
            if f"{y}_lo" in g.columns:
                lo, hi = g[f"{y}_lo"].to_numpy(), g[f"{y}_hi"].to_numpy()
                if interval == "band":
                    ax.fill_between(g[x], lo, hi, color=st["color"], alpha=0.2, linewidth=0)
                else:
                    ax.errorbar(g[x], g[y], yerr=[g[y] - lo, hi - g[y]], fmt="none", ecolor=st["color"], capsize=2,
                                lw=0.8)
            if kept:
                axes[1][col].plot(g[x], g["kept_fraction"], marker=".", color=st["color"], ls=st["ls"])
        ax.set_title(f"{method}: {title}", fontsize=10)
        ax.grid(alpha=0.3)
        axes[-1][col].set_xlabel(xlabel)
        ax.legend(fontsize=6.5, loc="best", title=legend_title or None, title_fontsize=6.5)
        if kept:
            axes[1][col].set_ylim(0, 1.02)
            axes[1][col].grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    if kept:
        axes[1][0].set_ylabel("kept fraction")
    if caption:
        fig.text(0.01, 0.005, caption, fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05 if caption else 0, 1, 1))
    return _save(fig, path)


def _board(path: Path) -> pd.DataFrame:
    """A board CSV; a clear error when it has no rows yet (a dataset not scored under this protocol)."""
    if not path.is_file() or not path.read_text().strip():
        raise ValueError(f"{path.name} has no rows yet: score the zoo first (`salbench leaderboard --dataset "
                         f"{path.name.split('.')[0].split('_')[0]}`)")
    return pd.read_csv(path)


def ssim_figure(dataset: str, out_dir: Path | None = None, lb_dir: Path | None = None) -> Path:
    df = _board((lb_dir or leaderboards_dir()) / f"{dataset}_ssim.csv")
    return _curves(df, "sigma", "ssim", f"{dataset}: SSIM of maps under input noise (higher = more stable)",
                   "noise σ (pixel space [0, 1])", "mean SSIM over kept images",
                   (out_dir or fig_dir()) / f"{dataset}_ssim.png", kept=True,
                   caption="SSIM between the map of each image and of its noisy copy (one draw per image and σ), "
                           "averaged over the 'kept' images: those whose prediction survives the noise "
                           "(PROTOCOL §3). Lower panels: the kept fraction.")


def road_figure(dataset: str, out_dir: Path | None = None, lb_dir: Path | None = None) -> Path:
    lb = lb_dir or leaderboards_dir()
    df = _board(lb / f"{dataset}_road.csv")
    labels = {}
    main = lb / f"{dataset}.csv"
    if main.is_file():
        m = pd.read_csv(main)
        labels = {(r["id"], r["method"]): f", AOPC {r['aopc']:.3f}" for _, r in m.iterrows()}
    return _curves(df, "percent_removed", "accuracy", f"{dataset}: ROAD, most relevant first (faster drop = more faithful)",
                   "% pixels removed, most relevant first (MoRF)", "accuracy on the set after removal",
                   (out_dir or fig_dir()) / f"{dataset}_road.png", interval="band", labels=labels,
                   caption="Fraction of the fixed image set still classified correctly after the most relevant "
                           "pixels are replaced by noisy linear imputation (PROTOCOL §3); AOPC in the legend.")


def sanity_figure(dataset: str, out_dir: Path | None = None, lb_dir: Path | None = None) -> Path | None:
    """The cascading model-parameter randomisation curves (``<dataset>_sanity.csv``, PROTOCOL §9.3): one
    panel per method, the Spearman rank correlation of |map| with the original after each step, for
    the first zoo model of each variant on the main board. None when no sanity values are stored."""
    lb = lb_dir or leaderboards_dir()
    path = lb / f"{dataset}_sanity.csv"
    if not path.is_file() or len(pd.read_csv(path)) == 0:
        return None
    df = pd.read_csv(path)
    board = _board(lb / f"{dataset}.csv")
    first = board[board["source"] == "zoo"].drop_duplicates("variant")[["id", "variant"]]
    df = df.merge(first, on="id")
    return _curves(df, "step", "spearman", f"{dataset}: model-parameter randomisation (MPRT), top-down",
                   "layers randomised, output layer first", "mean Spearman of |map| with the original",
                   (out_dir or fig_dir()) / f"{dataset}_sanity.png", legend_title="",
                   caption="Each step re-initialises one more layer, from the output down (PROTOCOL §9.3); a map "
                           "that depends on the model falls towards 0, a model-free control stays at 1. The gate "
                           "needs the last step below 0.5. One model per variant (the first on the board).")


def metric_panels(board: pd.DataFrame) -> list:
    """The panels of :func:`metrics_figure`: the registry's headline aggregates the board has columns for."""
    from salbench.benchmark.metric_registry import headline_aggregates

    return [a for _, a in headline_aggregates() if a.name in board.columns]


def metrics_figure(dataset: str, out_dir: Path | None = None, lb_dir: Path | None = None) -> Path:
    """One panel per headline aggregate of the metric registry (``metric_registry.headline_aggregates``:
    Gini, SSIM mean, log10 ROS, AOPC and any registered metric), one bar per model and method with its
    95% bootstrap interval, read from ``<dataset>.csv``."""
    df = _board((lb_dir or leaderboards_dir()) / f"{dataset}.csv")
    aggs = metric_panels(df)
    methods = list(dict.fromkeys(df["method"]))
    ids = list(dict.fromkeys(df["id"]))
    style = _style(list(zip(df["id"], df["variant"])))
    fig, axes = plt.subplots(1, len(aggs), figsize=(max(3.2 * len(aggs), 6), 4.2 + 0.12 * len(ids)), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    hatches = ("", "//", "..", "xx")
    for ax, agg in zip(axes[0], aggs):
        for j, method in enumerate(methods):
            sub = df[df["method"] == method].set_index("id").reindex(ids)
            y = sub[agg.name].to_numpy(dtype=float)
            pos = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(ids))]
            colors = [style[mid]["color"] for mid in ids]
            ax.barh(pos, y, height=width, color=colors, alpha=0.75, hatch=hatches[j % len(hatches)], edgecolor="k",
                    linewidth=0.3, label=method)
            if f"{agg.name}_lo" in sub.columns:
                lo, hi = sub[f"{agg.name}_lo"].to_numpy(dtype=float), sub[f"{agg.name}_hi"].to_numpy(dtype=float)
                ax.errorbar(y, pos, xerr=[y - lo, hi - y], fmt="none", ecolor="k", capsize=2, lw=0.8)
        better = "higher" if agg.direction > 0 else "lower"
        ax.set_title(f"{agg.name} ({better} is better)", fontsize=9)
        ax.set_yticks(range(len(ids)))
        ax.set_yticklabels(ids if ax is axes[0][0] else [], fontsize=6.5)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        lo_all = df[[c for c in (f"{agg.name}_lo", agg.name) if c in df.columns]].min().min()
        hi_all = df[[c for c in (f"{agg.name}_hi", agg.name) if c in df.columns]].max().max()
        pad = 0.08 * (hi_all - lo_all) if hi_all > lo_all else 0.01
        ax.set_xlim(lo_all - pad, hi_all + pad)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="k", hatch=hatches[j % len(hatches)])
               for j in range(len(methods))]
    fig.legend(handles, methods, fontsize=7, title="method", title_fontsize=7, loc="upper right")
    fig.suptitle(f"{dataset}: headline metrics per model (bars: 95% bootstrap CI over images)", fontsize=10)
    fig.text(0.01, 0.005, "One panel per registered metric (benchmark.metric_registry); colours as in the SSIM and "
                          "ROAD figures; x axes zoomed to the models' range.", fontsize=7, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    return _save(fig, (out_dir or fig_dir()) / f"{dataset}_metrics.png")


# the figures drawn from the board files alone (redrawn by `salbench figures` and after a submission)
BOARD_FIGURES = (metrics_figure, ssim_figure, road_figure)


def grid_images(imageset, n_images: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The images every saliency figure shows: ``n_images`` evenly spaced over the fixed set,
    as ``(x float [0, 1] (n, C, H, W), y (n,))``."""
    step = max(len(imageset) // n_images, 1)
    idx = torch.arange(0, step * n_images, step)[:n_images]
    return imageset.images[idx].float() / 255, imageset.labels[idx]


def gallery_key(sha256: str, images_sha256: str, *, n_images: int, ig_steps: int) -> str:
    """What a model's gallery PNG depends on; stored in the PNG (text chunk ``Description``) so
    an up-to-date gallery is never drawn again (``gallery_is_current``)."""
    return (f"salbench saliency gallery v1; weights sha256 {sha256}; image set sha256 {images_sha256}; "
            f"VG, IG {ig_steps} steps; {n_images} images")


def gallery_is_current(path: Path, key: str) -> bool:
    """Whether ``path`` is a gallery PNG drawn for ``key``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.text.get("Description") == key
    except (OSError, ValueError):
        return False


def model_gallery(model: torch.nn.Module, imageset, path: Path, *, title: str, key: str, n_images: int = 8,
                  ig_steps: int = 50) -> Path:
    """A small saliency gallery of one model: the set's grid images (``grid_images``), their VG
    maps (|grad|, hot) and IG maps (signed, blue-white-red), each map scaled by its own maximum as
    in ``saliency_grid``. Written atomically with ``key`` in the PNG's ``Description`` and no
    software/version text, so the bytes depend on the pixels alone."""
    import io

    from PIL import Image, PngImagePlugin

    from salbench.model_zoo.zoo import atomic_write_bytes

    x, y = grid_images(imageset, n_images)
    model.eval()
    vg = metrics.vanilla_gradient(model, x, y).detach()
    ig = metrics.integrated_gradients(model, x, y, n_steps=ig_steps).detach()
    names = CLASS_NAMES.get(imageset.dataset)
    fig, axes = plt.subplots(3, n_images, figsize=(0.9 * n_images + 0.3, 3.1), squeeze=False)
    for c in range(n_images):
        img = x[c].permute(1, 2, 0).squeeze(-1).numpy()
        axes[0][c].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        axes[0][c].set_title(names[int(y[c])] if names else f"class {int(y[c])}", fontsize=6)
        axes[1][c].imshow(vg[c].numpy() / (float(vg[c].max()) or 1.0), cmap="hot", vmin=0, vmax=1)
        axes[2][c].imshow(ig[c].numpy() / (float(ig[c].abs().max()) or 1.0), cmap="bwr", vmin=-1, vmax=1)
        for r in range(3):
            axes[r][c].set_xticks([]), axes[r][c].set_yticks([])
    for r, label in enumerate(("input", "VG", "IG")):
        axes[r][0].set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=7)
    fig.subplots_adjust(left=0.04, right=0.995, bottom=0.01, top=0.86, wspace=0.05, hspace=0.12)
    raw = io.BytesIO()
    fig.savefig(raw, format="png", dpi=72)
    plt.close(fig)
    # a 256-colour palette (median cut, no dithering: deterministic) halves the file
    with Image.open(raw) as im:
        pal = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", key)
    buf = io.BytesIO()
    pal.save(buf, format="png", optimize=True, pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())
    return path


def saliency_grid(models: dict[str, torch.nn.Module], imageset, *, n_images: int = 8, out_dir: Path | None = None,
                  ig_steps: int = 50) -> Path:
    """Rows: the input, then VG and IG maps of each model; columns: the same images."""
    x, y = grid_images(imageset, n_images)
    names = CLASS_NAMES.get(imageset.dataset)
    rows = [("input", None, x)]
    for method in ("VG", "IG"):
        for name, model in models.items():
            model.eval()
            if method == "VG":
                maps = metrics.vanilla_gradient(model, x, y)
            else:
                maps = metrics.integrated_gradients(model, x, y, n_steps=ig_steps)
            rows.append((f"{name} {method}", method, maps.detach()))
    fig, axes = plt.subplots(len(rows), n_images, figsize=(1.45 * n_images, 1.4 * len(rows)), squeeze=False,
                             constrained_layout=True)
    for r, (label, method, data) in enumerate(rows):
        for c in range(n_images):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if method is None:
                img = data[c].permute(1, 2, 0).squeeze(-1).numpy()
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
                label_c = int(y[c])
                ax.set_title(names[label_c] if names else f"class {label_c}", fontsize=7)
            elif method == "VG":
                m = data[c]
                im = ax.imshow(m.numpy() / (float(m.max()) or 1.0), cmap="hot", vmin=0, vmax=1)
            else:
                m = data[c]
                v = float(m.abs().max()) or 1.0
                im = ax.imshow(m.numpy() / v, cmap="bwr", vmin=-1, vmax=1)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
        if method is not None and r in (1, 1 + len(models)):  # one colour bar per method
            fig.colorbar(im, ax=list(axes[r:r + len(models), -1]), fraction=0.05, pad=0.02,
                         label="|VG| / image max" if method == "VG" else "IG / image max|IG|")
    fig.suptitle(f"{imageset.dataset}: VG (|grad|, hot) and IG (signed, blue-white-red), the same images; "
                 "each map scaled by its own maximum (per-image scaling)", fontsize=9)
    path = (out_dir or fig_dir()) / f"{imageset.dataset}_saliency_grid.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
