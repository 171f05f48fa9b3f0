"""The fuzzer's driver: many cases (in worker processes), a summary line, failing case files,
and the command line (`python -m attnopt.testing.fuzz`, `--replay CASE.json`)."""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnopt.testing.fuzz.grammar import BadCase, forms, load_case, sample
from attnopt.testing.fuzz.run import Outcome, run_case
from attnopt.testing.fuzz.torch_case import torch_source

DESCRIPTION = "Graph fuzzer: attention-like programs from a grammar of the real forms, and near misses."


@dataclass
class Summary:
    cases: int = 0
    failures: int = 0
    forms: set = field(default_factory=set)
    sites: int = 0
    rewritten: int = 0
    reverted: int = 0
    by_kind: dict = field(default_factory=dict)
    elapsed: float = 0.0
    failure_files: list = field(default_factory=list)

    def line(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.by_kind.items()))
        return (f"fuzz: {self.cases} cases ({kinds}), {len(self.forms)} forms exercised, "
                f"{self.sites} sites, {self.rewritten} rewritten, {self.reverted} reverted by "
                f"validation, {self.failures} failures, "
                f"{self.elapsed:.0f} s")


def _one(args: tuple[int, int, str]) -> tuple[int, dict[str, Any], Outcome]:
    seed, i, k = args
    c = sample(random.Random(f"{seed}-{i}"), k)
    return i, c, run_case(c)


def _init_worker() -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)


def fuzz(cases: int, seed: int, kind: str = "both", time_limit: float | None = None,
         out_dir: str | Path = "fuzz-failures", progress: bool = True, jobs: int = 1) -> Summary:
    """Run `cases` cases (case i draws its choices from seed and i alone, so any case replays
    on its own and the run does not depend on `jobs`)."""
    import multiprocessing as mp

    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    _init_worker()
    out = Path(out_dir)
    summ = Summary()
    t0 = time.time()
    kinds = ["torch", "onnx"] if kind == "both" else [kind]
    work = ((seed, i, kinds[i % len(kinds)]) for i in range(cases))
    pool = mp.get_context("fork").Pool(jobs, initializer=_init_worker) if jobs > 1 else None
    results = pool.imap_unordered(_one, work, chunksize=4) if pool else map(_one, work)
    prog = Progress(TextColumn("fuzz"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not progress, transient=False)
    try:
        with prog:
            task = prog.add_task("fuzz", total=cases, info="")
            for i, c, o in results:
                k = c["kind"]
                summ.cases += 1
                summ.by_kind[k] = summ.by_kind.get(k, 0) + 1
                summ.forms |= forms(c)
                summ.sites += o.sites
                summ.rewritten += o.rewritten
                summ.reverted += o.reverted
                if not o.ok:
                    summ.failures += 1
                    out.mkdir(parents=True, exist_ok=True)
                    f = out / f"{k}-{seed}-{i}.json"
                    f.write_text(json.dumps({"seed": seed, "index": i, "message": o.message,
                                             "choices": c}, indent=1))
                    summ.failure_files.append(str(f))
                    prog.console.print(f"[red]FAIL[/red] {f}: {o.message[:200]}", highlight=False)
                prog.update(task, advance=1,
                            info=f"{len(summ.forms)} forms, {summ.failures} failures")
                if time_limit is not None and time.time() - t0 > time_limit:
                    break
    finally:
        if pool:
            pool.terminate()
    summ.elapsed = time.time() - t0
    return summ


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attnopt.testing.fuzz", description=DESCRIPTION)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kind", choices=["torch", "onnx", "both"], default="both")
    ap.add_argument("--time-limit", type=float, default=None, help="stop after SECONDS")
    ap.add_argument("--out", default="fuzz-failures", help="directory for failing case files")
    ap.add_argument("--replay", default=None, help="re-run one case file and print its outcome")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    a = ap.parse_args(argv)
    if a.replay:
        try:
            c = load_case(a.replay)
        except BadCase as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        o = run_case(c)
        print(("ok" if o.ok else "FAIL: " + o.message), f"(sites {o.sites}, rewritten {o.rewritten})")
        if c["kind"] == "torch":
            print("class Case(nn.Module):\n" + torch_source(c))
        return 0 if o.ok else 1
    s = fuzz(a.cases, a.seed, a.kind, a.time_limit, a.out, progress=not a.no_progress,
             jobs=a.jobs)
    print(s.line())
    return 1 if s.failures else 0
