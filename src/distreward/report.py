"""The demo's report: sample grids (PNG), FD-over-iterations plot (matplotlib, Agg), markdown table."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch

from .data import to_uint8_images
from .utils.io import atomic_write_bytes

# Columns of the report table, in order: (metrics key, header, format)
TABLE_COLUMNS = [
    ("fd_reward", "FD (reward features) ↓", "{:.3f}"),
    ("fd_eval", "FD (held-out features) ↓", "{:.3f}"),
    ("precision", "precision ↑", "{:.3f}"),
    ("recall", "recall ↑", "{:.3f}"),
    ("density", "density", "{:.3f}"),
    ("coverage", "coverage ↑", "{:.3f}"),
    ("classifier_logp", "log p(class), evaluation samples", "{:.4f}"),
    ("reward_mean", "reward mean (last iteration)", "{:.4g}"),
    ("n", "samples (FD is biased by n: compare rows of equal n)", "{:.0f}"),
]


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> one uint8 (H', W', C) grid, `nrow` images per row (default ~sqrt(B))."""

    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty (B, C, H, W) batch, got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    ncol = math.ceil(b / nrow)
    u8 = to_uint8_images(images)
    grid = torch.zeros((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), dtype=torch.uint8)
    for i in range(b):
        r, k = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[:, top:top + h, left:left + w] = u8[i]
    return grid.permute(1, 2, 0)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write a sample grid as PNG (atomically)."""
    from PIL import Image

    g = image_grid(images, nrow).numpy()
    img = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def save_figure(fig, path: str | os.PathLike) -> Path:
    """A matplotlib figure as a PNG (laid out tightly, written atomically), then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_fd_curves(curves: dict[str, list[dict]], path: str | os.PathLike, keys=("fd_reward", "fd_eval"),
                   base: dict | None = None, reference: dict[str, list[dict]] | None = None,
                   xlabel: str = "GRPO iteration") -> Path:
    """FD over iterations, one panel per feature network, one line per run; `curves[run]` is a list of eval
    records with 'iteration' (any numeric `keys` of them: one panel each). The base model's value is drawn as a dashed line. `reference[run]` (records with
    'iteration', 'fd_ref'), when given, adds a panel: the FD of the reward's reference set (the SDE rollouts)
    after every iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(keys) + (1 if reference else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    if reference:
        ax = axes[0][-1]
        for name, recs in reference.items():
            ax.plot([r["iteration"] for r in recs], [r["fd_ref"] for r in recs], marker=".", label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fd_ref")
        ax.set_title("FD of the reward's reference set (reward features)")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax, key in zip(axes[0], keys):
        for name, recs in curves.items():
            pts = [(r["iteration"], r[key]) for r in recs if key in r and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        if base is not None and key in base:
            ax.axhline(base[key], color="gray", linestyle="--", label="base")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key)
        ax.set_title({"fd_reward": "FD, reward features", "fd_eval": "FD, held-out features"}.get(key, key))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no evaluation reports {key}", ha="center", va="center", transform=ax.transAxes)
    return save_figure(fig, path)


def metrics_table(rows: dict[str, dict]) -> str:
    """Markdown table: one row per model (base, distribution, sample, ...), the TABLE_COLUMNS as columns."""
    head = "| model | " + " | ".join(h for _, h, _ in TABLE_COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(TABLE_COLUMNS)
    lines = [head, sep]
    for name, m in rows.items():
        cells = []
        for key, _, fmt in TABLE_COLUMNS:
            v = m.get(key)
            cells.append(fmt.format(v) if isinstance(v, (int, float)) else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def relative_change(new: float, old: float) -> float:
    """(new - old) / old, the figure the targets are stated in."""
    return (new - old) / old if old else float("nan")


def plot_fd_vs_nfe(rows: list[dict], path: str | os.PathLike, keys=("fd_reward", "fd_eval"),
                   converged: dict[str, dict] | None = None, diff: bool = False) -> Path:
    """FD against network calls per sample (NFE), one panel per feature network: a line per model and solver
    (Euler solid, Heun dashed); `converged` ({model: row with the key and nfe}) adds each model's converged-solver
    point. `diff`: plot `<key>_diff` ± `<key>_diff_err` (each model's FD minus the base's on the same noise, paired
    error) with a zero line instead of FD itself. Better model or better sampler: a model below the base at every
    NFE is a better model; one below it only at the served NFE is a better-fitted sampler."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.8), squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(models + [m for m in (converged or {}) if m not in models])}
    for ax, key in zip(axes[0], keys):
        y = f"{key}_diff" if diff else key
        for m in models:
            for method, style in (("euler", "-"), ("heun", "--")):
                pts = sorted((r["nfe"], r[y], r.get(f"{y}_err") or 0) for r in rows
                             if r["model"] == m and r["method"] == method and r.get(y) is not None)
                if pts:
                    x, v, e = zip(*pts)
                    ax.errorbar(x, v, yerr=e if diff else None, fmt=style, marker="o", ms=4, capsize=2,
                                color=colors[m], label=f"{m} ({method})")
        for m, r in (converged or {}).items():
            if r.get(y) is not None and m in colors:
                ax.errorbar([r["nfe"]], [r[y]], yerr=[r.get(f"{y}_err") or 0], fmt="*", ms=10, color=colors[m],
                            label=f"{m} (converged)")
        if diff:
            ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_xscale("log")
        nfes = sorted({r["nfe"] for r in rows if r["method"] == "euler"}
                      | {r["nfe"] for r in (converged or {}).values() if "nfe" in r})
        ax.set_xticks(nfes, [str(v) for v in nfes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("network calls per sample (NFE)")
        title = {"fd_reward": "reward features", "fd_eval": "held-out features"}.get(key, key)
        ax.set_ylabel(f"{key}(model) - {key}(base), same noise" if diff else key)
        ax.set_title(f"FD minus the base's FD, {title}" if diff else f"FD, {title}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def seed_summary(rows: dict[str, dict], names, seeds, figures) -> dict:
    """{name: {figure: {"mean", "std" (ddof 1; None with one seed), "seeds": [...]}}} of a table's rows keyed
    "<name>/seed<s>" (the studies' arms or searchers); missing rows and values are left out."""
    out = {}
    for name in names:
        out[name] = {}
        for k in figures:
            vals = [rows[f"{name}/seed{s}"].get(k) for s in seeds if f"{name}/seed{s}" in rows]
            vals = [v for v in vals if v is not None]
            if vals:
                out[name][k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1
                                else None, "seeds": vals}
    return out


def mean_std(entry: dict | None, fmt: str = "{:.4f}") -> str:
    """'0.2160 ± 0.0940' of a summary entry {"mean", "std"} over seeds (the mean alone with one seed, '–' without)."""
    if not entry:
        return "–"
    return fmt.format(entry["mean"]) + (f" ± {fmt.format(entry['std'])}" if entry.get("std") is not None else "")


def change_with_error(change) -> str:
    """'-31.2% ± 3.1%' of a (relative change, its standard error) pair ('–' without one)."""
    if not change:
        return "–"
    g, se = change
    return f"{g:+.1%} ± {se:.1%}"


def with_error(value, err, fmt: str = "{:.3f}") -> str:
    """'3.056 ± 0.081' (the value alone without an error, '–' without a value)."""
    if value is None:
        return "–"
    return fmt.format(value) + (f" ± {fmt.format(err)}" if err is not None else "")
