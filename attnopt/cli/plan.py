"""`attnopt plan`: choose a variant per attention site of a .pt2 model, write the plan as JSON,
and optionally a self-contained HTML report and PNG pictures of the chosen layouts.

  attnopt plan MODEL.pt2 -o plan.json [--policy exact|approx] [--max-error 1e-2] [--target cpu]
               [--calibration inputs.npz] [--layout [SITE=|LENGTH=]SEGMENTS ...]
               [--report report.html] [--png DIR]

--layout gives sites their token layout instead of the inferred one (planner/layout.py). It prints
a table of the sites (layout and where it came from, variant, predicted speedup, measured error,
why a site has no approximation) after the one-line summary.

The report is ONE file: inline CSS, every picture a base64 PNG, no scripts, no network: summary
(sites, predicted end-to-end speedup on the target, measured error), a per-site table, each
chosen sparsity layout with its tile occupancy (cost/draw.py), each site's roofline position,
and the speedup-vs-error curve of the planner's greedy walk.
"""
from __future__ import annotations

import base64
import html
import io
import os
import tempfile
from pathlib import Path
from typing import Optional

import typer

from attnopt.cli.common import UNSAFE_PICKLE_OPTION
from attnopt.pipeline.outputs import write_bytes_atomically


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _img(data: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode()}">')


def layout_png(choice, path: Path | None = None) -> bytes | None:
    """The chosen layout's picture (cost/draw.py), or None for a variant without a layout."""
    from attnopt.cli.draw import draw_png
    from attnopt.sparsity.simulator import simulate

    lay = choice.variant.layout if choice is not None else None
    if lay is None:
        return None
    res = simulate(lay, choice.variant.q_tile, choice.variant.kv_tile)
    with tempfile.TemporaryDirectory() as d:
        p = draw_png(lay, res, Path(d) / "layout.png", leading=choice.leading,
                     trailing=choice.trailing)
        data = p.read_bytes()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return data


def _roofline_png(plan, hw) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dt = "bf16"
    peak = hw.peak_flops.get(dt, max(hw.peak_flops.values())) * hw.mma_efficiency
    bw = hw.mem_bw * hw.mem_efficiency
    ai = np.logspace(-1, 4, 200)
    ax.loglog(ai, np.minimum(peak, ai * bw), color="#444", label=f"roof ({hw.name})")
    for sp in plan.sites:
        c = sp.choice
        if c is None or not c.time_s or not c.bytes:
            continue
        x = c.flops / c.bytes
        ax.scatter([x], [c.flops / c.time_s], s=30,
                   color="#1565c0" if c.exact else "#ff9800")
        ax.annotate(sp.site, (x, c.flops / c.time_s), fontsize=6)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("predicted FLOP/s")
    ax.set_title("roofline position per site (blue exact, orange approximate)", fontsize=9)
    ax.legend(fontsize=7)
    return _png_bytes(fig)


def _curve_png(plan) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # accepted steps in walk order, from the exact plan (1x by convention, error 0)
    xs = [0.0]
    ys = [1.0]
    for w in (w for w in plan.walk if w.accepted):
        xs.append(w.rel_l2 or 0.0)
        ys.append(w.predicted_speedup)
    ax.plot(xs, ys, "-o", color="#1565c0", label="accepted (combined error)")
    rej = [(w.rel_l2 if w.rel_l2 is not None else w.alone_rel_l2, w.predicted_speedup)
           for w in plan.walk if not w.accepted]
    unbounded = sum(1 for x, _ in rej if not np.isfinite(x))  # NaN/Inf outputs: off the chart
    rej = [(x, y) for x, y in rej if np.isfinite(x)]
    ax.scatter([x for x, _ in rej], [y for _, y in rej], marker="x", color="#c62828",
               label="rejected" + (f" ({unbounded} more with unbounded error)" if unbounded else ""))
    ax.axvline(plan.max_error, color="#888", linestyle="--", label=f"max_error {plan.max_error:g}")
    ax.set_xlabel("measured end-to-end relative L2")
    ax.set_ylabel(f"predicted end-to-end speedup ({plan.target})")
    ax.set_title("speedup vs error walked by the planner", fontsize=9)
    ax.legend(fontsize=7)
    return _png_bytes(fig)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;
font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#f0f0f0}
.exact{color:#1565c0}.approx{color:#e65100}img{max-width:100%;border:1px solid #ddd;margin:4px 0}
h2{margin-top:1.5em}.kv{font-family:monospace}"""


def render_report(plan, model_name: str = "") -> str:
    """The plan as one self-contained HTML document."""
    from attnopt.cost.hardware import get_profile

    try:
        hw = get_profile(plan.target)
    except ValueError:  # "cuda": another machine's GPU, described by its properties there
        hw = None
    e = html.escape
    pr, me = plan.predicted, plan.measured
    n_planned = sum(1 for s in plan.sites if s.choice is not None)
    n_approx = sum(1 for s in plan.sites if s.choice is not None and not s.choice.exact)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>attnopt plan {e(model_name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>attnopt plan {e(model_name)}</h1>", "<h2>Summary</h2><table>"]
    rows = [("policy", plan.policy), ("max_error", f"{plan.max_error:g}"),
            ("target", f"{plan.target} ({plan.hardware})"),
            ("sites", f"{len(plan.sites)} found, {n_planned} planned, {n_approx} approximate"),
            ("predicted attention speedup", f"{pr.get('attention_speedup', 1.0):.3f}x"),
            ("predicted end-to-end speedup", f"{pr.get('end_to_end_speedup', 1.0):.3f}x"),
            ("measured attention speedup", "-" if me.get("attention_speedup") is None else
             f"{me['attention_speedup']:.3f}x over {me.get('timed_sites', 0)} timed sites on this "
             f"machine (predicted {pr.get('attention_speedup', 1.0):.3f}x)"),
            ("measured end-to-end relative L2", f"{me.get('rel_l2', 0.0):.3g}"),
            ("measured cosine similarity", f"{me.get('cosine', 1.0):.6f}"),
            ("calibration batches", str(me.get("calibration_batches", "-"))),
            ("held-out relative L2", "-" if me.get("holdout_rel_l2") is None else
             f"{me['holdout_rel_l2']:.3g} ({me.get('holdout_batches', 1)} batch, never used to choose)")]
    parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows]
    parts.append("</table><h2>Sites</h2><table><tr><th>site</th><th>q x kv</th><th>mask</th>"
                 "<th>token layout</th><th>variant</th><th>tiles (q / kv)</th><th>predicted time</th>"
                 "<th>bound</th><th>speedup: predicted / measured</th><th>site rel L2</th>"
                 "<th>e2e rel L2</th><th>note</th></tr>")
    for s in plan.sites:
        sp = s.spec
        head = (f"<tr><td>{e(s.site)}</td><td>{sp.get('q_len')} x {sp.get('kv_len')}</td>"
                f"<td>{e(str(sp.get('mask', {}).get('kind')))}</td><td>{e(layout_text(s))}</td>")
        c = s.choice
        if c is None:
            parts.append(head + "<td>kept</td>" + "<td>-</td>" * 6 + f"<td>{e(s.reason)}</td></tr>")
            continue
        m = s.measured
        cls = "exact" if c.exact else "approx"
        parts.append(
            head + f"<td class='{cls}'>{e(c.name)}</td>"
            f"<td class='kv'>{e(str(list(c.variant.q_tile)))} / {e(str(list(c.variant.kv_tile)))}</td>"
            f"<td>{_dur(c.time_s)}</td><td>{e(c.bound)}</td><td>{e(speedups(s))}</td>"
            f"<td>{'-' if m is None or m.site_rel_l2 is None else f'{m.site_rel_l2:.3g}'}</td>"
            f"<td>{'-' if m is None else f'{m.e2e_rel_l2:.3g}'}</td><td>{e(s.reason)}</td></tr>")
    timed_note = ("Measured speedups: each site's chosen kernel against its exact kernel, timed on "
                  "this machine (attnopt plan --time)." if any(getattr(s, "timed", None) for s in plan.sites)
                  else "No site was timed: plan with --time (target this machine) to measure "
                       "speedups beside the predicted ones.")
    parts.append(f"</table><p>{e(timed_note)}</p>")
    parts.append("<h2>Chosen sparsity layouts and tile occupancy</h2>")
    drawn = {}
    for s in plan.sites:
        if s.choice is None or s.choice.variant.layout is None:
            continue
        key = (s.choice.variant.layout, s.choice.variant.q_tile, s.choice.variant.kv_tile)
        if key not in drawn:
            drawn[key] = layout_png(s.choice)
        parts.append(f"<h3>{e(s.site)}: {e(s.choice.name)}</h3>{_img(drawn[key], s.site)}")
    if not drawn:
        parts.append("<p>No site uses a sparsity layout.</p>")
    if hw is None:
        parts.append(f"<h2>Roofline</h2><p>No profile of target {e(plan.target)} on this machine.</p>")
    else:
        parts.append(f"<h2>Roofline ({e(hw.name)})</h2>{_img(_roofline_png(plan, hw), 'roofline')}")
    parts.append("<h2>Speedup vs error</h2>")
    if plan.walk:
        parts.append(_img(_curve_png(plan), "speedup vs error"))
        parts.append("<table><tr><th>step</th><th>site</th><th>candidate</th><th>saved</th>"
                     "<th>alone rel L2</th><th>combined rel L2</th><th>predicted e2e speedup</th>"
                     "<th>accepted</th><th>reason</th></tr>")
        for w in plan.walk:
            parts.append(
                f"<tr><td>{w.step}</td><td>{e(w.site)}</td><td>{e(w.candidate)}</td>"
                f"<td>{w.saved_s * 1e6:.2f} us</td><td>{w.alone_rel_l2:.3g}</td>"
                f"<td>{'-' if w.rel_l2 is None else f'{w.rel_l2:.3g}'}</td>"
                f"<td>{w.predicted_speedup:.3f}x</td><td>{'yes' if w.accepted else 'no'}</td>"
                f"<td>{e(w.reason)}</td></tr>")
        parts.append("</table><p>Order: candidates sorted by predicted time saved per unit of "
                     "end-to-end error measured alone; each accepted while the combined error "
                     "stays within the safety fraction of max_error.</p>")
    else:
        parts.append("<p>No approximate candidates were considered (policy exact, or none "
                     "cheaper than the exact kernels).</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def layout_text(sp) -> str:
    """A site's token layout for tables: its segments and whether they were given or inferred."""
    tl = getattr(sp, "token_layout", None)
    return "-" if tl is None else f"{tl.describe()} ({tl.source})"


def speedups(sp) -> str:
    """A planned site's predicted speedup beside its measured one, when timed."""
    c, t = sp.choice, getattr(sp, "timed", None)
    if c is None:
        return "-"
    if t is None:
        return f"{c.speedup:.2f}x / -"
    return f"{c.speedup:.2f}x / {t.speedup:.2f}x ({_dur(c.time_s)} / {_dur(t.time_s)} on {t.device})"


def _dur(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1.0 else f"{s:.2f} s"


def sites_table(plan):
    """The sites as a rich table for the terminal: layout, variant, predicted speedup, measured
    error, and why a site has no approximation."""
    from rich.table import Table
    from rich.text import Text

    t = Table(box=None, pad_edge=False, show_edge=False)
    for col in ("site", "q x kv", "layout", "variant", "speedup predicted / measured",
                "measured e2e rel L2", "reason"):
        t.add_column(col, overflow="fold")
    for s in plan.sites:
        c, m = s.choice, s.measured
        cells = (s.site, f"{s.spec.get('q_len')} x {s.spec.get('kv_len')}", layout_text(s),
                 "kept" if c is None else c.name, speedups(s),
                 "-" if m is None else f"{m.e2e_rel_l2:.3g}", s.reason or "-")
        t.add_row(*(Text(x) for x in cells))  # Text: brackets in names are not console markup
    return t


def write_report(plan, path: str | os.PathLike, model_name: str = "") -> Path:
    path = Path(path)
    text = render_report(plan, model_name)
    write_bytes_atomically(text.encode("utf-8"), path)
    return path


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan_cmd(
        model: Path = typer.Argument(..., help="a .pt2 file (torch.export program)"),
        output: Path = typer.Option(..., "-o", "--output", help="where to write the plan JSON"),
        policy: str = typer.Option("exact", "--policy", help="exact | approx"),
        max_error: float = typer.Option(1e-2, "--max-error",
                                        help="end-to-end relative L2 budget of approximations, in (0, 1]"),
        target: Optional[str] = typer.Option(None, "--target",
                                             help="cpu | h100 | h200 | b200 | a100 (default: this machine)"),
        calibration: Optional[Path] = typer.Option(None, "--calibration",
                                                   help=".npz of calibration inputs"),
        report: Optional[Path] = typer.Option(None, "--report", help="write an HTML report"),
        png: Optional[Path] = typer.Option(None, "--png", help="directory for layout PNGs"),
        time_kernels: bool = typer.Option(
            False, "--time", help="time each site's chosen kernel and its exact kernel on this "
                                  "machine, so the report shows measured speedups beside the "
                                  "predicted ones (the target must be this machine)"),
        layout: Optional[list[str]] = typer.Option(
            None, "--layout", metavar="[SITE=|LENGTH=]SEGMENTS",
            help="a token layout replacing the inferred one (repeatable): for one site "
                 "(SITE=..., the name the plan lists), for every site of one sequence length "
                 "(4096=...) or for every site (no prefix). SEGMENTS in token order, comma-separated: "
                 "grid:AxB[xC] (one grid, row-major) and NAME:N global tokens (text, cls, reg, "
                 "sink, any name) before or after it, e.g. text:512,grid:64x64 or "
                 "grid:8x32x32,text:226 or cls:1,grid:32x32,reg:4; a site's own SPEC wins over its "
                 "length's, which wins over the one for every site"),
        allow_unsafe_pickle: bool = UNSAFE_PICKLE_OPTION,
        debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
    ) -> None:
        """Choose a kernel variant per attention site of MODEL; write the plan as JSON."""
        from attnopt.cli.common import out, pickle_policy, user_errors
        from attnopt.errors import BadArgument, InputNotFound

        with user_errors(debug), pickle_policy(allow_unsafe_pickle):
            from attnopt.planner.schema import POLICIES, TARGETS
            from attnopt.planner.search import make_plan

            # option values first, each a one-line error with exit code 2
            if policy not in POLICIES:
                raise BadArgument(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}")
            if target is not None and target.lower() not in TARGETS:
                raise BadArgument(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
            if not 0.0 < max_error <= 1.0:  # NaN fails too
                raise BadArgument(f"--max-error must be in (0, 1] (an end-to-end relative L2 "
                                  f"budget), got {max_error:g}")
            from attnopt.planner.layout import parse_layouts

            layouts = parse_layouts(layout or None, "--layout")
            if not model.exists():
                raise InputNotFound(f"no such file: {model}")
            from attnopt.frontends import check_input
            from attnopt.pipeline.outputs import check_output

            check_input(model)
            reads = [("input model", model), ("calibration file", calibration)]
            check_output(output, reads)
            if report is not None:
                check_output(report, reads + [("plan output", output)])
            plan = make_plan(model, policy=policy, max_error=max_error,
                             target=None if target is None else target.lower(),
                             calibration=calibration, layout=layouts, time_kernels=time_kernels)
            plan.save(output)
            if report is not None:
                write_report(plan, report, model.name)
            if png is not None:
                for s in plan.sites:
                    if s.choice is not None and s.choice.variant.layout is not None:
                        layout_png(s.choice, png / f"{s.site.replace('/', '_')}.png")
            pr, me = plan.predicted, plan.measured
            planned = sum(1 for s in plan.sites if s.choice is not None)
            out.print(f"{planned}/{len(plan.sites)} sites planned for {plan.target}: predicted "
                      f"end-to-end speedup {pr.get('end_to_end_speedup', 1.0):.3f}x, measured "
                      f"relative L2 {me.get('rel_l2', 0.0):.3g}"
                      + ("" if me.get("holdout_rel_l2") is None else f" (held out: {me['holdout_rel_l2']:.3g})")
                      + f"; wrote {output}")
            out.print(sites_table(plan))
