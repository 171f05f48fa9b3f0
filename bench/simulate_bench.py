"""Benchmark the GNA tile simulator and tabulate simulated bounds for real model layouts.

Usage: PYTHONPATH=. python bench/simulate_bench.py [--repeats 21] [--write bench/RESULTS.md]
Prints the "## Simulator (issue 4)" markdown section; --write replaces that section of the
results file (creating the file with its header when absent), via a temp file and rename.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from attnopt.cost.hardware import B200, allowed_tiles
from attnopt.cost.search import search
from attnopt.sparsity.simulator import simulate
from attnopt.ir import GNALayout

SECTION = "## Simulator (issue 4)"
HEADER = "# attnopt benchmark results\n"

# (name, shape, window, [(q tile, kv tile), ...]) — tiles from B200's literal table
MODELS = [
    ("4K image DiT (FLUX-like)", (256, 256), (80, 80), [((16, 16), (16, 8))]),
    ("video DiT", (30, 48, 80), (18, 24, 24), [((4, 8, 8), (4, 4, 8)), ((2, 8, 8), (2, 8, 8))]),
]


def median_ms(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def section(repeats: int) -> str:
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    cmd = "PYTHONPATH=. python bench/simulate_bench.py --repeats %d --write bench/RESULTS.md" % repeats
    lines = [SECTION, "",
             f"Command: `{cmd}`  ",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores (this project's 2-core CPU VM), "
             f"Python {platform.python_version()}, numpy only  ",
             f"Date: {date}", "",
             "### Simulation time (median of %d runs, one `simulate()` call)" % repeats, "",
             "| layout | window | stride | Q tile | KV tile | tiling | time (ms) |",
             "|---|---|---|---|---|---|---|"]
    timing_cases = [
        ((256, 256), (80, 80), (1, 1), (16, 16), (16, 8), False),
        ((256, 256), (80, 80), (1, 1), (16, 16), (16, 8), True),
        ((256, 256), (80, 80), (1, 1), (128,), (128,), False),
        ((30, 48, 80), (18, 24, 24), (1, 1, 1), (4, 8, 8), (4, 4, 8), False),
        ((30, 48, 80), (18, 24, 24), (1, 1, 1), (4, 8, 8), (4, 4, 8), True),
        ((30, 48, 80), (18, 24, 24), (1, 1, 1), (128,), (128,), False),
    ]
    for shape, w, s, qt, kt, dyn in timing_cases:
        lay = GNALayout(shape, w, s)
        ms = median_ms(lambda: simulate(lay, qt, kt, dynamic=dyn), repeats)
        kind = ("box" if len(qt) == len(shape) else "run") + (", dynamic KV" if dyn else "")
        lines.append(f"| {_x(shape)} | {_x(w)} | {_x(s)} | {_x(qt)} | {_x(kt)} | {kind} | "
                     f"{ms:.2f} |")
    lines += ["", "### Simulated bounds for real model layouts", "",
              "Speedup upper bound = KV tiles of full attention / KV tiles of the worst Q tile "
              "(static KV tiling); FLOP bound = prod(L)/prod(w). Tiles from the B200 table "
              "(`TILE_TABLES['blackwell']`). Strides: 1, half window, tile-aligned (= Q tile), and "
              "the best perfectly block-sparse stride found by `search()` over the table.", "",
              "| model | tokens | window | stride | Q tile | KV tile | worst / mean / full KV "
              "tiles | masked tiles | block-sparse | bound | FLOP bound |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, shape, w, tiles in MODELS:
        for qt, kt in tiles:
            strides = [("1", (1,) * len(w)), ("half window", tuple(x // 2 for x in w)),
                       ("tile-aligned", tuple(min(q, x) for q, x in zip(qt, w)))]
            for label, s in strides:
                r = simulate(GNALayout(shape, w, s), qt, kt)
                lines.append(_row(name, shape, w, f"{_x(s)} ({label})", r))
        best = search(shape, w, tiles=allowed_tiles(B200, len(shape)),
                      require_block_sparse=True).best
        if best is not None:
            r = simulate(GNALayout(shape, w, best.stride), best.q_tile, best.kv_tile)
            lines.append(_row(name, shape, w, f"{_x(best.stride)} (search, block-sparse)", r))
    lines.append("")
    return "\n".join(lines)


def _x(t) -> str:
    return "x".join(str(v) for v in t)


def _row(name, shape, w, stride, r) -> str:
    return (f"| {name} | {_x(shape)} | {_x(w)} | {stride} | {_x(r.q_tile)} | {_x(r.kv_tile)} | "
            f"{r.max_kv_tiles} / {r.mean_kv_tiles:.1f} / {r.full_kv_tiles} | {r.masked_tiles} | "
            f"{'yes' if r.fully_block_sparse else 'no'} | {r.speedup_upper_bound:.2f}x | "
            f"{r.flop_speedup:.2f}x |")


def write_section(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else HEADER
    if SECTION in old:
        start = old.index(SECTION)
        nxt = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + ("" if nxt < 0 else old[nxt + 1:])
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".RESULTS.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(new)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--write", type=Path, default=None)
    a = ap.parse_args(argv)
    text = section(a.repeats)
    print(text)
    if a.write:
        write_section(a.write, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
