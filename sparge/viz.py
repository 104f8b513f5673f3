"""Plots (matplotlib, an optional dependency: ``pip install "sparge[plot]"``,
or ``pip install ".[plot]"`` from a checkout).

- ``plot_block_mask``: one head's block mask;
- ``plot_density``: density per layer and head of a calibration run (heat map);
- ``plot_tradeoff``: density-vs-error points the calibration search evaluated,
  with the chosen point of every head;
- ``plot_error_density``: error against density per dataset and selection
  method (oracles and sparge's modes), from ``bench_predict_quality.py`` rows.

Each takes ``path`` (writes a PNG and returns None) or ``ax`` (draws there);
``plot_error_density`` draws a grid of panels and returns the figure without ``path``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .calibration import CalibrationResult

__all__ = ["plot_block_mask", "plot_density", "plot_tradeoff", "plot_error_density"]


def matplotlib_missing(what: str = "sparge.viz") -> Optional[str]:
    """None when matplotlib imports, else one line saying that ``what`` needs it
    and which extra brings it (for an installed sparge and for a checkout)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return (f'{what} needs matplotlib, which is not installed: pip install "sparge[plot]" '
                '(from a sparge checkout: pip install ".[plot]")')
    return None


def _plt():
    missing = matplotlib_missing()
    if missing:
        raise ImportError(missing, name="matplotlib")
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path, plt):
    if path is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def plot_block_mask(mask: torch.Tensor, head: int = 0, batch: int = 0, path=None, ax=None, title: Optional[str] = None):
    """Draw ``mask[batch, head]`` (a ``[B, H, nq, nk]`` bool block mask; black = computed)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError(f"mask: expected a [B, H, nq, nk] tensor, got {getattr(mask, 'shape', type(mask))}")
    if not 0 <= batch < mask.shape[0] or not 0 <= head < mask.shape[1]:
        raise ValueError(f"head/batch: ({head}, {batch}) outside mask shape {tuple(mask.shape)}")
    plt = _plt()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 5))
    m = mask[batch, head].detach().cpu().float().numpy()
    ax.imshow(m, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    ax.set_title(title or f"block mask, head {head}: density {m.mean():.3f} (black = computed)")
    ax.set_xlabel("k-block")
    ax.set_ylabel("q-block")
    _finish(fig, path, plt)
    return ax


def _density_grid(result: "CalibrationResult"):
    """[layers, heads] mean density per layer path (in first-call order)."""
    paths, rows = [], {}
    for r in result.records:
        if r.path not in rows:
            paths.append(r.path)
            rows[r.path] = []
        rows[r.path].append(r.density.float())
    H = max(len(rows[p][0]) for p in paths)
    grid = torch.full((len(paths), H), float("nan"))
    for i, p in enumerate(paths):
        d = torch.stack(rows[p]).mean(0)
        grid[i, :len(d)] = d
    return paths, grid


def plot_density(result: "CalibrationResult", path=None, ax=None):
    """Heat map of the calibrated density per layer (rows) and head (columns)."""
    if not result.records:
        raise ValueError("result: has no calibrated calls to plot")
    plt = _plt()
    paths, grid = _density_grid(result)
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(min(14, 3 + 0.35 * grid.shape[1]), min(14, 1.5 + 0.3 * len(paths))))
    im = ax.imshow(grid.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if len(paths) <= 40:
        ax.set_yticks(range(len(paths)))
        ax.set_yticklabels(paths, fontsize=7)
    ax.set_title(f"density after calibration (mean {grid.nanmean():.3f}; target {result.metric} "
                 f"<= {result.target})")
    ax.figure.colorbar(im, ax=ax, label="computed / allowed blocks")
    _finish(fig, path, plt)
    return ax


def plot_tradeoff(result: "CalibrationResult", path=None, ax=None):
    """Sparsity (1 - density) against error for every point the search
    evaluated (grey) and the chosen value of each head (colour)."""
    if not result.records:
        raise ValueError("result: has no calibrated calls to plot")
    plt = _plt()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.5, 4.8))
    d = torch.cat([r.curve["density"].reshape(-1) for r in result.records])
    e = torch.cat([r.curve["error"].reshape(-1) for r in result.records])
    ax.scatter((1 - d).numpy(), e.numpy(), s=4, c="0.7", label="evaluated (head, θ, τ)")
    cd = torch.cat([r.density for r in result.records])
    ce = torch.cat([r.error for r in result.records])
    ax.scatter((1 - cd).numpy(), ce.numpy(), s=14, c="tab:red", label="chosen per head")
    ax.axhline(result.target, color="k", lw=0.8, ls="--", label=f"target {result.target}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(1e-4, float(e[e > 0].min()) if bool((e > 0).any()) else 1e-4))
    ax.set_xlabel("sparsity (1 - density)")
    ax.set_ylabel(f"error vs dense ({result.metric})")
    ax.set_title("sparsity vs error, calibration search")
    ax.legend(fontsize=8, loc="upper left")
    _finish(fig, path, plt)
    return ax


_ERROR_DENSITY_STYLE = {"oracle_row": ("k", "-", "o", "oracle, per row"), "oracle_global": ("0.5", "--", "s", "oracle, global budget"),
                        "topk": ("tab:blue", "-", "^", "sparge topk"), "cdf": ("tab:orange", "-", "v", "sparge cdf"),
                        "sim": ("tab:green", "", "D", "sparge topk, sim_threshold")}


def plot_error_density(rows, path=None, metric: str = "rel_l1"):
    """Error (``metric`` of each row, log scale) against achieved density, one
    panel per dataset, one curve per method: ``rows`` are dicts with ``dataset``,
    ``method``, ``density`` and ``metric`` (as written by
    ``benchmarks/bench_predict_quality.py``). Writes ``path`` or returns the figure."""
    rows = list(rows)
    if not rows:
        raise ValueError("rows: nothing to plot")
    plt = _plt()
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    cols = min(4, len(names))
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((float(r["density"]), float(r[metric])) for r in rows
                         if r["dataset"] == name and r["method"] == method and float(r[metric]) > 0)
            if not pts:
                continue
            color, ls, marker, label = _ERROR_DENSITY_STYLE.get(method, (None, "-", ".", method))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, ls=ls, marker=marker, ms=3.5, lw=1.1,
                    label=label)
        ax.set_yscale("log")
        ax.set_xlim(0, 1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("density (computed / allowed blocks)")
        ax.set_ylabel(f"error vs dense ({metric})")
        ax.grid(True, which="major", lw=0.3)
    axes.flat[0].legend(fontsize=7, loc="upper right")
    if path is None:
        return fig
    _finish(fig, path, plt)
    return None
