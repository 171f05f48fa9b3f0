"""PNG pictures of a simulated GNA layout (matplotlib, Agg, imported lazily).

Conventions: pictures are in the simulator's permuted grid order (dilation groups contiguous).
Left: the worst Q tile (blue outline) and the KV tiles it visits, green = full (no element
mask), orange = masked; 3-D layouts are projected over the first axis (orange wins), 1-D ones
are a strip. Right: KV tiles visited per Q tile over the whole map (3-D: max over the first tile
axis; run tiling: per run index). Files are written to a temporary name and renamed, so a
failed draw never leaves a broken PNG.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from attnopt.sparsity.simulator import SimResult, tile_detail
from attnopt.ir import GNALayout
from attnopt.pipeline.outputs import write_bytes_atomically


def draw_png(layout: GNALayout, result: SimResult, path: str | Path, leading: int = 0,
             trailing: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    path = Path(path)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 5.5))
    title = (f"GNA {'x'.join(map(str, layout.shape))}, window {'x'.join(map(str, layout.window))}, "
             f"stride {'x'.join(map(str, layout.stride))}; Q tile {result.q_tile}, "
             f"KV tile {result.kv_tile}{' dynamic' if result.dynamic_kv else ''}: "
             f"bound {result.speedup_upper_bound:.2f}x (FLOP {result.flop_speedup:.2f}x)")
    fig.suptitle(title, fontsize=10)
    n = len(layout.shape)
    if result.tiling == "box":
        det = tile_detail(layout, result.q_tile, result.kv_tile, result.worst_q_tile,
                          dynamic=result.dynamic_kv)
        shape2 = layout.shape[-2:] if n >= 2 else (1, layout.shape[0])
        img = np.zeros(shape2, dtype=np.int8)
        edges = []
        # 3-D: projected over the first axis; a cell is masked if any tile above it is
        for lo, hi, full in zip(det.kv_lo, det.kv_hi, det.full):
            r0, r1 = (lo[-2], hi[-2]) if n >= 2 else (0, 1)
            cell = img[r0:r1, lo[-1]:hi[-1]]
            np.maximum(cell, 1 if full else 2, out=cell)
            edges.append((lo[-1] - 0.5, r0 - 0.5, hi[-1] - lo[-1], r1 - r0))
        cmap = ListedColormap(["#f2f2f2", "#4caf50", "#ff9800"])
        ax0.imshow(img, cmap=cmap, vmin=0, vmax=2, interpolation="nearest",
                   aspect="equal" if n >= 2 else "auto")
        for x, y, w, h in edges:  # tile boundaries
            ax0.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="white", linewidth=0.4))
        qr0, qr1 = (det.q_lo[-2], det.q_hi[-2]) if n >= 2 else (0, 1)
        ax0.add_patch(Rectangle((det.q_lo[-1] - 0.5, qr0 - 0.5), det.q_hi[-1] - det.q_lo[-1],
                                qr1 - qr0, fill=False, edgecolor="#1565c0", linewidth=2))
        nfull = int(det.full.sum())
        ax0.set_title(f"worst Q tile {result.worst_q_tile}{' (projected over axis 0)' if n == 3 else ''}:"
                      f" {len(det.full)} KV tiles, {nfull} full, {len(det.full) - nfull} masked",
                      fontsize=9)
        heat = result.kv_tiles_per_q
        heat = heat.max(axis=0) if heat.ndim == 3 else heat
        heat = heat[None, :] if heat.ndim == 1 else heat
    else:
        vis = result.kv_tiles_per_q
        ax0.plot(vis, label="visited", color="#1565c0")
        ax0.plot(result.masked_per_q, label="masked", color="#ff9800")
        ax0.set_xlabel("Q run index")
        ax0.legend()
        ax0.set_title(f"KV runs per Q run (worst {result.max_kv_tiles})", fontsize=9)
        heat = vis[None, :]
    im = ax1.imshow(heat, cmap="viridis", interpolation="nearest", aspect="auto")
    if n == 1 or heat.shape[0] == 1:  # a single row: its y axis would only show -0.5..0.5
        ax1.set_yticks([])
        ax1.set_xlabel("Q tile index")
    if n == 1 and result.tiling == "box":
        ax0.set_yticks([])
        ax0.set_xlabel("key position")
    fig.colorbar(im, ax=ax1, label="KV tiles visited")
    ax1.set_title(f"KV tiles per Q tile: max {result.max_kv_tiles}, mean "
                  f"{result.mean_kv_tiles:.1f} of {result.full_kv_tiles}; masked "
                  f"{result.masked_tiles}/{result.total_kv_tiles}", fontsize=9)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(buf.getvalue(), path)
    return path
