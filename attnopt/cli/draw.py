"""PNG pictures of a simulated GNA layout (matplotlib, Agg, imported lazily).

Conventions: the left panel is in the simulator's permuted grid order (dilation groups contiguous;
the same as the token grid without dilation), the middle one in the real token grid's order. Global
tokens (`leading` before the grid, `trailing` after it: joint attention's text, a class token) are
drawn as a strip beside the grid, left and right, one cell per grid row each way (they are not on
the grid: the strip only says how many there are and that every query attends them).
Left: the worst Q tile (blue outline) and the KV tiles it visits, green = full (no element mask),
orange = masked; 3-D layouts are projected over the first axis (orange wins), 1-D ones are a strip.
Middle: one central query (blue) and the keys it attends (green) on the token grid; 3-D: its own
frame (every frame in its window has the same pattern: the mask is a product over axes).
Right: KV tiles visited per Q tile over the whole map (3-D: max over the first tile axis; run
tiling: per run index), with integer tile axes. Files are written to a temporary name and renamed,
so a failed draw never leaves a broken PNG.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from attnopt.ir import GNALayout
from attnopt.pipeline.outputs import write_bytes_atomically
from attnopt.sparsity.gna import dim_masks
from attnopt.sparsity.simulator import SimResult, tile_detail

GREEN, ORANGE, BLUE, GREY = "#4caf50", "#ff9800", "#1565c0", "#f2f2f2"


def draw_png(layout: GNALayout, result: SimResult, path: str | Path, leading: int = 0,
             trailing: int = 0) -> Path:
    """Draw the three panels into `path` (PNG). leading / trailing: global tokens around the grid
    (default: the simulation's own counts)."""
    import matplotlib.pyplot as plt

    fig = layout_figure(layout, result, leading, trailing)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(buf.getvalue(), path)
    return path


def layout_figure(layout: GNALayout, result: SimResult, leading: int = 0, trailing: int = 0):
    """The matplotlib Figure draw_png saves (axes: worst tile, central query, tile occupancy)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    leading = leading or int(getattr(result, "leading", 0) or 0)
    trailing = trailing or int(getattr(result, "trailing", 0) or 0)
    fig, (ax0, axq, ax1) = plt.subplots(1, 3, figsize=(17, 5.5), width_ratios=(1, 1, 1.1))
    title = (f"GNA {'x'.join(map(str, layout.shape))}, window {'x'.join(map(str, layout.window))}, "
             f"stride {'x'.join(map(str, layout.stride))}; Q tile {result.q_tile}, "
             f"KV tile {result.kv_tile}{' dynamic' if result.dynamic_kv else ''}: "
             f"bound {result.speedup_upper_bound:.2f}x (FLOP {result.flop_speedup:.2f}x)")
    if leading or trailing:
        title += f"; global tokens: {leading} leading, {trailing} trailing"
    fig.suptitle(title, fontsize=10)
    _tiles_panel(ax0, layout, result, leading, trailing)
    _query_panel(axq, layout, leading, trailing)
    _occupancy_panel(fig, ax1, layout, result)
    return fig


def _rows_cols(layout: GNALayout) -> tuple[int, int]:
    return (layout.shape[-2], layout.shape[-1]) if len(layout.shape) >= 2 else (1, layout.shape[0])


def _strips(ax, layout: GNALayout, leading: int, trailing: int, color: str = GREEN) -> None:
    """Global tokens as strips beside the grid (leading left, trailing right), labelled."""
    from matplotlib.patches import Rectangle

    rows, cols = _rows_cols(layout)
    width = max(1.0, 0.08 * cols)
    gap = max(0.5, 0.03 * cols)
    lo, hi = -0.5, cols - 0.5
    for n, side in ((leading, "leading"), (trailing, "trailing")):
        if not n:
            continue
        x = lo - gap - width if side == "leading" else hi + gap
        ax.add_patch(Rectangle((x, -0.5), width, rows, facecolor=color, edgecolor="#333", linewidth=0.6))
        ax.text(x + width / 2, (rows - 1) / 2, f"{n} {side} global tokens", rotation=90, ha="center",
                va="center", fontsize=8, color="white" if color in (GREEN, BLUE) else "#333")
        lo, hi = (x, hi) if side == "leading" else (lo, x + width)
    if leading or trailing:
        ax.set_xlim(lo - 0.2, hi + 0.2)
        # grid positions only: a tick under a strip would read as a grid column
        ax.set_xticks([t for t in ax.get_xticks() if 0 <= t <= cols - 1])


def _tiles_panel(ax0, layout: GNALayout, result: SimResult, leading: int, trailing: int) -> None:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    n = len(layout.shape)
    if result.tiling != "box":
        ax0.plot(result.kv_tiles_per_q, label="visited", color=BLUE)
        ax0.plot(result.masked_per_q, label="masked", color=ORANGE)
        ax0.set_xlabel("Q run index")
        ax0.legend()
        ax0.set_title(f"KV runs per Q run (worst {result.max_kv_tiles})", fontsize=9)
        return
    det = tile_detail(layout, result.q_tile, result.kv_tile, result.worst_q_tile, dynamic=result.dynamic_kv)
    img = np.zeros(_rows_cols(layout), dtype=np.int8)
    edges = []
    # 3-D: projected over the first axis; a cell is masked if any tile above it is
    for lo, hi, full in zip(det.kv_lo, det.kv_hi, det.full):
        r0, r1 = (lo[-2], hi[-2]) if n >= 2 else (0, 1)
        cell = img[r0:r1, lo[-1]:hi[-1]]
        np.maximum(cell, 1 if full else 2, out=cell)
        edges.append((lo[-1] - 0.5, r0 - 0.5, hi[-1] - lo[-1], r1 - r0))
    ax0.imshow(img, cmap=ListedColormap([GREY, GREEN, ORANGE]), vmin=0, vmax=2, interpolation="nearest",
               aspect="equal" if n >= 2 else "auto")
    for x, y, w, h in edges:  # tile boundaries
        ax0.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="white", linewidth=0.4))
    qr0, qr1 = (det.q_lo[-2], det.q_hi[-2]) if n >= 2 else (0, 1)
    ax0.add_patch(Rectangle((det.q_lo[-1] - 0.5, qr0 - 0.5), det.q_hi[-1] - det.q_lo[-1],
                            qr1 - qr0, fill=False, edgecolor=BLUE, linewidth=2))
    _strips(ax0, layout, leading, trailing)
    nfull = int(det.full.sum())
    ax0.set_title(f"worst Q tile {result.worst_q_tile}{' (projected over axis 0)' if n == 3 else ''}:"
                  f" {len(det.full)} KV tiles, {nfull} full, {len(det.full) - nfull} masked", fontsize=9)
    if n == 1:
        ax0.set_yticks([])
        ax0.set_xlabel("key position")


def central_query(layout: GNALayout) -> tuple[tuple[int, ...], np.ndarray]:
    """(the central query's grid coordinates, bool [rows, cols] of the keys it attends in its own
    frame / on the grid / along the sequence for 1-D), from the per-axis masks (gna.py)."""
    c = tuple(L // 2 for L in layout.shape)
    rows = [m[ci] for m, ci in zip(dim_masks(layout), c)]  # per axis: key coordinates allowed
    if len(rows) == 1:
        return c, rows[0][None, :]
    return c, rows[-2][:, None] & rows[-1][None, :]


def _query_panel(ax, layout: GNALayout, leading: int, trailing: int) -> None:
    from matplotlib.colors import ListedColormap

    n = len(layout.shape)
    c, keys = central_query(layout)
    img = keys.astype(np.int8)
    img[(c[-2] if n >= 2 else 0), c[-1]] = 2
    ax.imshow(img, cmap=ListedColormap([GREY, GREEN, BLUE]), vmin=0, vmax=2, interpolation="nearest",
              aspect="equal" if n >= 2 else "auto")
    _strips(ax, layout, leading, trailing)
    where = "x".join(map(str, c))
    extra = ""
    if n == 3:
        frames = np.flatnonzero(dim_masks(layout)[0][c[0]])
        extra = f",\nframes {frames.min()}..{frames.max()} alike (its frame shown)"
    ax.set_title(f"query {where} (blue) attends {int(keys.sum())} grid keys (green)"
                 + (f" per frame{extra}" if n == 3 else "")
                 + (" + all global ones" if leading or trailing else ""), fontsize=9)
    if n == 1:
        ax.set_yticks([])
        ax.set_xlabel("key position")


def _occupancy_panel(fig, ax1, layout: GNALayout, result: SimResult) -> None:
    from matplotlib.ticker import MaxNLocator

    n = len(layout.shape)
    if result.tiling == "box":
        heat = result.kv_tiles_per_q
        heat = heat.max(axis=0) if heat.ndim == 3 else heat
        heat = heat[None, :] if heat.ndim == 1 else heat
    else:
        heat = result.kv_tiles_per_q[None, :]
    im = ax1.imshow(heat, cmap="viridis", interpolation="nearest", aspect="auto")
    # tiles are counted, not measured: ticks only at whole tile indices
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.yaxis.set_major_locator(MaxNLocator(integer=True))
    if n == 1 or heat.shape[0] == 1:  # a single row: its y axis would only show -0.5..0.5
        ax1.set_yticks([])
        ax1.set_xlabel("Q tile index")
    else:
        ax1.set_xlabel(f"Q tile index along axis {n - 1}")
        ax1.set_ylabel(f"Q tile index along axis {n - 2}" + (" (max over axis 0)" if n == 3 else ""))
    cb = fig.colorbar(im, ax=ax1, label="KV tiles visited")
    cb.locator = MaxNLocator(integer=True)
    cb.update_ticks()
    ax1.set_title(f"KV tiles per Q tile: max {result.max_kv_tiles}, mean "
                  f"{result.mean_kv_tiles:.1f} of {result.full_kv_tiles}; masked "
                  f"{result.masked_tiles}/{result.total_kv_tiles}", fontsize=9)
