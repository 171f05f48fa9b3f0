"""`attnopt simulate`: the GNA tile simulator on the command line.

Sizes are written "256x256" (one entry per grid dimension); window, stride, dilation and
causal may give one value for every dimension ("80", "true"). Tiles are never broadcast: a
1-entry tile on a multi-D grid means runs of the flattened sequence. Bad arguments end with a
one-line message on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import json
from typing import Optional

import typer

from attnopt.ir import GNALayout

_TRUE = {"1", "true", "t", "yes", "y"}
_FALSE = {"0", "false", "f", "no", "n"}


class ArgError(ValueError):
    pass


def parse_dims(text: str, name: str) -> tuple[int, ...]:
    parts = text.strip().lower().split("x")
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        raise ArgError(f"--{name}: expected sizes like 16x16, got {text!r}") from None
    if any(v < 1 for v in vals):
        raise ArgError(f"--{name}: sizes must be positive, got {text!r}")
    return vals


def parse_bools(text: str, name: str) -> tuple[bool, ...]:
    out = []
    for p in text.strip().lower().split("x"):
        if p in _TRUE:
            out.append(True)
        elif p in _FALSE:
            out.append(False)
        else:
            raise ArgError(f"--{name}: expected e.g. 0x1 or true, got {text!r}")
    return tuple(out)


def _broadcast(vals: tuple, n: int, name: str) -> tuple:
    if len(vals) == 1:
        return vals * n
    if len(vals) != n:
        raise ArgError(f"--{name} has {len(vals)} entries but --shape has {n} dimensions")
    return vals


def _check_png(png: str) -> None:
    """--png names a picture: a .png (a typo must not write a PNG over a model file)."""
    from pathlib import Path

    if Path(png).suffix.lower() != ".png":
        raise ArgError(f"--png must name a .png file, got {png!r}")


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code=2)


def register(app: typer.Typer) -> None:
    """Add the `simulate` command to `app`."""

    @app.command("simulate")
    def simulate_cmd(
        shape: str = typer.Option(..., help="token grid, e.g. 256x256 or 30x48x80"),
        window: str = typer.Option(..., help="window per dimension, e.g. 80x80"),
        stride: Optional[str] = typer.Option(None, help="stride per dimension (default 1)"),
        dilation: Optional[str] = typer.Option(None, help="dilation per dimension (default 1)"),
        causal: Optional[str] = typer.Option(None, help="causal per dimension, e.g. 0x1 or true"),
        q_tile: Optional[str] = typer.Option(None, "--q-tile",
                                             help="Q tile: a box (16x16) or a run (128)"),
        kv_tile: Optional[str] = typer.Option(None, "--kv-tile", help="KV tile, like --q-tile"),
        dynamic: bool = typer.Option(False, "--dynamic", help="dynamic KV tiling"),
        attn_share: Optional[float] = typer.Option(None, "--attn-share",
                                                   help="attention's share of runtime (Amdahl)"),
        hw: str = typer.Option("b200", "--hw", help="hardware whose tile table --search uses "
                                                    "and default tiles come from"),
        as_json: bool = typer.Option(False, "--json", help="print JSON"),
        png: Optional[str] = typer.Option(None, "--png", help="draw the layout to this PNG"),
        search: bool = typer.Option(False, "--search",
                                    help="search strides and tiles for the best bound"),
        require_block_sparse: bool = typer.Option(False, "--require-block-sparse",
                                                  help="search: only perfectly block-sparse"),
    ) -> None:
        """Simulate a GNA layout: KV tiles per Q tile, masking, and speedup bounds."""
        from attnopt.cli.common import user_errors

        with user_errors(False):  # anything unforeseen is still one line, never a traceback
            from attnopt.sparsity import gna
            from attnopt.cost.hardware import allowed_tiles, get_profile
            from attnopt.sparsity.simulator import simulate

            try:
                shp = parse_dims(shape, "shape")
                n = len(shp)
                win = _broadcast(parse_dims(window, "window"), n, "window")
                st = _broadcast(parse_dims(stride, "stride"), n, "stride") if stride else ()
                dil = _broadcast(parse_dims(dilation, "dilation"), n, "dilation") if dilation else ()
                cau = _broadcast(parse_bools(causal, "causal"), n, "causal") if causal else ()
                layout = GNALayout(shp, win, st, dil, cau)
                gna.validate(layout)
                profile = get_profile(hw)
                if q_tile is None or kv_tile is None:
                    qs, ks = allowed_tiles(profile, n)
                qt = parse_dims(q_tile, "q-tile") if q_tile else qs[0]
                kt = parse_dims(kv_tile, "kv-tile") if kv_tile else ks[0]
                if attn_share is not None and not 0.0 <= attn_share <= 1.0:
                    raise ArgError(f"--attn-share must be in [0, 1], got {attn_share}")
                res = simulate(layout, qt, kt, dynamic=dynamic, attn_share=attn_share)
                found = None
                if search:
                    from attnopt.cost.search import search as run_search
                    found = run_search(shp, win, hw=profile, dilation=layout.dilation,
                                       causal=layout.causal, dynamic=dynamic,
                                       require_block_sparse=require_block_sparse)
                if png:
                    from attnopt.cli.draw import draw_png
                    _check_png(png)
                    draw_png(layout, res, png)
            except (ValueError, OSError) as e:
                _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
                return
            if as_json:
                out = res.to_json()
                if found is not None:
                    out["search"] = found.to_json()
                if png:
                    out["png"] = png
                typer.echo(json.dumps(out, indent=1))
                return
            _print_table(res, found, png)


def _print_table(res, found, png) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"GNA {'x'.join(map(str, res.shape))} window "
                    f"{'x'.join(map(str, res.window))} stride {'x'.join(map(str, res.stride))}")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    rows = [
        ("Q tile / KV tile", f"{res.q_tile} / {res.kv_tile} ({res.tiling}, "
                             f"{'dynamic' if res.dynamic_kv else 'static'} KV)"),
        ("dilation / causal", f"{res.dilation} / {res.causal}"),
        ("Q tiles", str(res.num_q_tiles)),
        ("KV tiles, full attention", str(res.full_kv_tiles)),
        ("KV tiles, worst Q tile", str(res.max_kv_tiles)),
        ("KV tiles, mean Q tile", f"{res.mean_kv_tiles:.2f}"),
        ("visited tiles (total)", str(res.total_kv_tiles)),
        ("masked tiles", str(res.masked_tiles)),
        ("perfectly block-sparse", "yes" if res.fully_block_sparse else "no"),
        ("speedup upper bound", f"{res.speedup_upper_bound:.2f}x"),
        ("FLOP-wise bound", f"{res.flop_speedup:.2f}x"),
    ]
    if res.e2e_speedup is not None:
        rows.append((f"end-to-end (attention {res.attn_share:.0%})", f"{res.e2e_speedup:.2f}x"))
    for r in rows:
        t.add_row(*r)
    console.print(t)
    if found is not None and found.best is not None:
        s = Table(title="search: Pareto set (window, stride) vs bound")
        for c in ("window", "stride", "Q tile", "KV tile", "bound", "block-sparse"):
            s.add_column(c)
        for p in found.pareto:
            s.add_row("x".join(map(str, p.window)), "x".join(map(str, p.stride)),
                      "x".join(map(str, p.q_tile)), "x".join(map(str, p.kv_tile)),
                      f"{p.speedup_upper_bound:.2f}x", "yes" if p.fully_block_sparse else "no")
        console.print(s)
        b = found.best
        console.print(f"best: stride {'x'.join(map(str, b.stride))}, Q tile {b.q_tile}, "
                      f"KV tile {b.kv_tile} -> {b.speedup_upper_bound:.2f}x")
    elif found is not None:
        console.print("search: no configuration satisfies the constraints")
    if png:
        console.print(f"wrote {png}")
