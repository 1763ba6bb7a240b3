"""layer_scores.png: layers x modules heatmaps per metric, and the layer-score bar chart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from spear.analysis.metrics import MatrixTable

DEFAULT_PANELS = ("swci", "svdr", "svdr_whole", "sv_shift", "rel_change", "snr_gd_base", "snr_base")


def plot_layer_scores(table: MatrixTable, ranking: dict[str, Any], out_path: Path, panels: tuple[str, ...] = DEFAULT_PANELS) -> Path:
    """Write the figure (matplotlib Agg) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = tuple(p for p in panels if p in table.columns)
    modules = list(dict.fromkeys(r.module for r in table.rows))
    n_layers = table.num_layers
    cols = 3
    rows = math.ceil(len(panels) / cols) + 1
    fig = plt.figure(figsize=(5.2 * cols, 3.2 * rows + max(0, n_layers - 16) * 0.08 * rows), dpi=80)
    # fixed spacing: tight_layout costs more than all the drawing
    grid = fig.add_gridspec(rows, cols, left=0.05, right=0.97, bottom=0.06, top=0.96, wspace=0.35, hspace=0.55)
    for k, metric in enumerate(panels):
        ax = fig.add_subplot(grid[k // cols, k % cols])
        mat = np.full((n_layers, len(modules)), np.nan)
        for r in table.rows:
            mat[r.layer, modules.index(r.module)] = r.values[metric]
        im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(metric, fontsize=9)
        ax.set_xticks(range(len(modules)), [m.split(".")[-1] for m in modules], rotation=60, fontsize=6)
        ax.set_ylabel("layer", fontsize=7)
        ax.tick_params(axis="y", labelsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    ax = fig.add_subplot(grid[rows - 1, :])
    scores = [lay["score"] if lay["score"] is not None else 0.0 for lay in ranking["layers"]]
    top = set(ranking["order"][: max(1, len(scores) // 4)])
    colors = ["tab:red" if i in top else "tab:blue" for i in range(len(scores))]
    ax.bar(range(len(scores)), scores, color=colors)
    ax.set_xlabel("layer (red: top 25%, restored first)", fontsize=8)
    ax.set_ylabel(f"score ({ranking['impact']['name']})", fontsize=8)
    ax.set_xticks(range(len(scores)))
    ax.tick_params(labelsize=6)
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)
