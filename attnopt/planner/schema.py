"""A plan is input: every plan file, dict or object is checked before anything uses it.

`read_plan_file` reads a plan file (size-capped, UTF-8 JSON); `check_plan_json` checks a plan's
JSON value field by field (schema, types, ranges, consistency) and raises `BadPlan` naming the
first bad field in one line; `check_plan_fits` checks, when a plan is applied to a model, that
every choice fits the site it names (the site exists, heads within its heads in whole KV groups,
the layout covers exactly its tokens, a choice marked exact is one its mask implies).

Error values (relative L2) that are unbounded (a candidate whose output holds NaN or Inf where
the reference is finite) are written as the string "inf": JSON has no infinity, and a plan must
be writable whatever the planner measured.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any, Sequence

from attnopt.errors import BadArgument, InputNotFound

FORMAT, VERSION = "attnopt.plan", 1
POLICIES = ("exact", "approx")
# "cuda": this machine's GPU of a kind without a profile of its own, described by its properties
# (codegen.device.local_target); a plan can target it only on such a machine.
TARGETS = ("cpu", "h100", "h200", "b200", "a100", "cuda")
# The kernel families a plan may name: the site's own exact kernel (dense, causal, gqa_decode),
# the exact sparse kernels a mask implies (block_sparse_gna, sliding_window), and approximate
# GNA layouts (block_sparse_gna).
FAMILIES = ("dense", "causal", "gqa_decode", "block_sparse_gna", "sliding_window")

MAX_PLAN_BYTES = 64 << 20   # a 100-layer per-head plan is well under 1 MiB
MAX_DEPTH = 16              # plans nest 4 levels deep (sites[i].choice.layout.window)
MAX_STRING = 10_000
MAX_ITEMS = 1_000_000       # entries of any one list or object
MAX_RANK = 3                # grid / tile dimensions
MAX_EXTENT = 1 << 24        # tokens along one grid dimension, leading / trailing tokens, window sides
MAX_TOKENS = 1 << 31        # tokens of a whole grid
MAX_TILE = 1 << 16
MAX_HEADS = 1 << 16
INF = "inf"                 # an unbounded error value in plan JSON

_CONTROL = re.compile(r"[\x00-\x1f\x7f\[\]]")  # control characters; brackets are console markup


class BadPlan(BadArgument, ValueError):
    """A plan (file, dict or object) or planner argument that is not valid: exit code 2.
    Also a ValueError, as plan errors were before they had their own class."""


def _where(path: str) -> str:
    return f"plan field {path!r}" if path else "plan"


def bad(path: str, why: str) -> BadPlan:
    return BadPlan(f"{_where(path)}: {why}")


def _tname(x: Any) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "a boolean"
    if isinstance(x, numbers.Number):
        return "a number"
    if isinstance(x, str):
        return "a string"
    if isinstance(x, (list, tuple)):
        return "a list"
    if isinstance(x, dict):
        return "an object"
    return type(x).__name__


def _short(x: Any) -> str:
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


# ---- reading -------------------------------------------------------------------------------------

def parse_plan_text(text: str | bytes, where: str = "plan") -> Any:
    """The JSON value of a plan's text; BadPlan for text that is not JSON (one line)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadPlan(f"{where} is not a JSON plan: not UTF-8 text (byte {e.start})") from None
    if len(text) > MAX_PLAN_BYTES:
        raise BadPlan(f"{where} is not a plan: {len(text)} characters (at most {MAX_PLAN_BYTES})")
    try:
        return json.loads(text)
    except RecursionError:
        raise BadPlan(f"{where} is not a plan: JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        raise BadPlan(f"{where} is not a JSON plan: {e.msg} at line {e.lineno} column {e.colno}") from None


def read_plan_file(path: str | os.PathLike) -> Any:
    """The JSON value of a plan file: InputNotFound when it does not exist, BadPlan when it
    cannot be read, is larger than MAX_PLAN_BYTES or is not JSON."""
    p = Path(path)
    try:
        if p.is_dir():
            raise BadPlan(f"plan {path} is a directory, not a plan file")
        with open(p, "rb") as fh:  # read at most the cap: /dev/zero and friends stat as empty
            data = fh.read(MAX_PLAN_BYTES + 1)
    except FileNotFoundError:
        raise InputNotFound(f"no such file: {path}") from None
    except OSError as e:
        raise BadPlan(f"cannot read plan {path}: {e.strerror or e}") from None
    if len(data) > MAX_PLAN_BYTES:
        raise BadPlan(f"plan {path} is larger than {MAX_PLAN_BYTES >> 20} MiB: not a plan")
    return parse_plan_text(data, f"plan {path}")


# ---- any JSON value: depth, sizes, finite numbers --------------------------------------------

def scan(x: Any, path: str = "", depth: int = 0) -> None:
    """Plain JSON values only (objects with string keys, lists, strings, finite numbers, booleans,
    null), at most MAX_DEPTH deep, MAX_ITEMS per container, MAX_STRING per string."""
    if depth > MAX_DEPTH:
        raise bad(path, f"nested more than {MAX_DEPTH} levels deep")
    if x is None or isinstance(x, (bool, str)):
        if isinstance(x, str) and len(x) > MAX_STRING:
            raise bad(path, f"a string of {len(x)} characters (at most {MAX_STRING})")
        return
    if isinstance(x, numbers.Integral):
        return
    if isinstance(x, numbers.Real):
        if not math.isfinite(float(x)):
            raise bad(path, f"{x} is not a finite number")
        return
    if isinstance(x, dict):
        if len(x) > MAX_ITEMS:
            raise bad(path, f"an object of {len(x)} fields (at most {MAX_ITEMS})")
        for k, v in x.items():
            if not isinstance(k, str):
                raise bad(path, f"field name {_short(k)} is not a string")
            scan(v, f"{path}.{k}" if path else k, depth + 1)
        return
    if isinstance(x, (list, tuple)):
        if len(x) > MAX_ITEMS:
            raise bad(path, f"a list of {len(x)} entries (at most {MAX_ITEMS})")
        for i, v in enumerate(x):
            scan(v, f"{path}[{i}]", depth + 1)
        return
    raise bad(path, f"{type(x).__name__} is not a JSON value")


# ---- typed fields --------------------------------------------------------------------------------

def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def obj(d: Any, path: str, required: Sequence[str], optional: Sequence[str] = ()) -> dict:
    if not isinstance(d, dict):
        raise bad(path, f"must be an object, got {_tname(d)}")
    for k in d:
        if k not in required and k not in optional:
            raise bad(_join(path, k), "unknown field")
    for k in required:
        if k not in d:
            raise bad(_join(path, k), "missing")
    return d


def integer(x: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise bad(path, f"must be an integer, got {_tname(x)} {_short(x)}")
    if not lo <= int(x) <= hi:
        raise bad(path, f"{int(x)} is out of range [{lo}, {hi}]")
    return int(x)


def number(x: Any, path: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise bad(path, f"must be a number, got {_tname(x)} {_short(x)}")
    v = float(x)
    if not math.isfinite(v):
        raise bad(path, f"{v} is not a finite number")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(path, f"{v:g} is out of range [{'-inf' if lo is None else f'{lo:g}'}, "
                        f"{'inf' if hi is None else f'{hi:g}'}]")
    return v


def error_value(x: Any, path: str) -> float:
    """A measured error: a finite number >= 0, or "inf" (unbounded: NaN/Inf outputs)."""
    if isinstance(x, str) and x == INF:
        return math.inf
    return number(x, path, 0.0)


def boolean(x: Any, path: str) -> bool:
    if not isinstance(x, bool):
        raise bad(path, f"must be true or false, got {_tname(x)} {_short(x)}")
    return x


def string(x: Any, path: str, max_len: int = MAX_STRING, nonempty: bool = False,
           plain: bool = False) -> str:
    if not isinstance(x, str):
        raise bad(path, f"must be a string, got {_tname(x)} {_short(x)}")
    if len(x) > max_len:
        raise bad(path, f"a string of {len(x)} characters (at most {max_len})")
    if nonempty and not x:
        raise bad(path, "must not be empty")
    if plain and _CONTROL.search(x):
        raise bad(path, f"{_short(x)} holds control characters or brackets")
    return x


def choice_of(x: Any, path: str, options: Sequence[str]) -> str:
    if not isinstance(x, str) or x not in options:
        raise bad(path, f"{_short(x)} is not one of {', '.join(options)}")
    return x


def int_list(x: Any, path: str, lo: int, hi: int, min_len: int = 1, max_len: int = MAX_RANK
             ) -> list[int]:
    if not isinstance(x, (list, tuple)):
        raise bad(path, f"must be a list, got {_tname(x)} {_short(x)}")
    if not min_len <= len(x) <= max_len:
        raise bad(path, f"{len(x)} entries, must have {min_len}"
                        + ("" if min_len == max_len else f" to {max_len}"))
    return [integer(v, f"{path}[{i}]", lo, hi) for i, v in enumerate(x)]


# ---- the plan ------------------------------------------------------------------------------------

_TOP = ("format", "version", "policy", "max_error", "target", "hardware", "sites")
_PREDICTED = ("attention_dense_s", "attention_s", "other_s", "attention_speedup", "end_to_end_speedup",
              "other_share_measured")
_CHOICE = ("name", "family", "exact", "q_tile", "kv_tile")
_CHOICE_OPT = ("layout", "leading", "trailing", "window", "heads", "predicted")
_LAYOUT = ("shape", "window", "stride", "dilation", "causal")
_CAND_PREDICTED = ("time_s", "baseline_time_s", "speedup", "flops", "bytes", "bound")
_WALK = ("step", "site", "candidate", "saved_s", "alone_rel_l2", "rel_l2", "cosine",
         "predicted_speedup", "accepted")


def check_plan_json(d: Any) -> None:
    """Raise BadPlan naming the first field of `d` that is not a valid attnopt plan (v1)."""
    if not isinstance(d, dict):
        raise BadPlan(f"not an attnopt plan: the JSON is {_tname(d)}, not an object")
    if d.get("format") != FORMAT:
        raise BadPlan(f"not an attnopt plan (format {_short(d.get('format'))}, expected {FORMAT!r})")
    if type(d.get("version")) is not int or d["version"] != VERSION:
        raise BadPlan(f"plan version {_short(d.get('version'))} is not supported (only {VERSION})")
    scan(d)
    obj(d, "", _TOP, ("predicted", "measured", "walk"))
    policy = choice_of(d["policy"], "policy", POLICIES)
    me = number(d["max_error"], "max_error")
    if not 0.0 < me <= 1.0:
        raise bad("max_error", f"{me:g} is outside (0, 1] (an end-to-end relative L2 budget)")
    choice_of(d["target"], "target", TARGETS)
    string(d["hardware"], "hardware", 200)
    if d.get("predicted") is not None:
        for k, v in obj(d["predicted"], "predicted", (), _PREDICTED).items():
            number(v, f"predicted.{k}", 0.0)
    if d.get("measured") is not None:
        _check_plan_measured(d["measured"])
    sites = d["sites"]
    if not isinstance(sites, (list, tuple)):
        raise bad("sites", f"must be a list, got {_tname(sites)}")
    seen: dict[str, int] = {}
    for i, s in enumerate(sites):
        p = f"sites[{i}]"
        obj(s, p, ("site", "status", "choice"), ("reason", "spec", "measured", "token_layout", "timed"))
        name = string(s["site"], f"{p}.site", 1000, nonempty=True)
        if name in seen:
            raise bad(f"{p}.site", f"site {name!r} is already planned by sites[{seen[name]}]")
        seen[name] = i
        status = choice_of(s["status"], f"{p}.status", ("planned", "kept"))
        if "reason" in s:
            string(s["reason"], f"{p}.reason")
        if s.get("spec") is not None and not isinstance(s["spec"], dict):  # informational
            raise bad(f"{p}.spec", f"must be an object, got {_tname(s['spec'])}")
        if s.get("measured") is not None:
            m = obj(s["measured"], f"{p}.measured", ("e2e_rel_l2", "e2e_cosine"), ("site_rel_l2",))
            if m.get("site_rel_l2") is not None:
                error_value(m["site_rel_l2"], f"{p}.measured.site_rel_l2")
            error_value(m["e2e_rel_l2"], f"{p}.measured.e2e_rel_l2")
            number(m["e2e_cosine"], f"{p}.measured.e2e_cosine", -1.001, 1.001)
        if s.get("timed") is not None:
            t = obj(s["timed"], f"{p}.timed", ("time_s", "baseline_time_s", "speedup", "device"))
            for k in ("time_s", "baseline_time_s", "speedup"):
                number(t[k], f"{p}.timed.{k}", 0.0)
            string(t["device"], f"{p}.timed.device", 100, plain=True)
        c = s["choice"]
        if (c is None) != (status == "kept"):
            raise bad(f"{p}.choice", f"a {status} site must have "
                                     f"{'no choice (null)' if status == 'kept' else 'a choice'}")
        if s.get("token_layout") is not None:
            check_token_layout(s["token_layout"], f"{p}.token_layout")
        if c is not None:
            _check_choice(c, f"{p}.choice", policy)
            _check_choice_on_layout(c, s.get("token_layout"), f"{p}.choice")
    walk = d.get("walk")
    if walk is not None:
        if not isinstance(walk, (list, tuple)):
            raise bad("walk", f"must be a list, got {_tname(walk)}")
        for i, w in enumerate(walk):
            p = f"walk[{i}]"
            obj(w, p, _WALK, ("reason",))
            integer(w["step"], f"{p}.step", 1, MAX_ITEMS)
            string(w["site"], f"{p}.site", 1000)
            string(w["candidate"], f"{p}.candidate", 1000)
            number(w["saved_s"], f"{p}.saved_s")
            error_value(w["alone_rel_l2"], f"{p}.alone_rel_l2")
            if w["rel_l2"] is not None:
                error_value(w["rel_l2"], f"{p}.rel_l2")
            if w["cosine"] is not None:
                number(w["cosine"], f"{p}.cosine", -1.001, 1.001)
            number(w["predicted_speedup"], f"{p}.predicted_speedup", 0.0)
            boolean(w["accepted"], f"{p}.accepted")
            if "reason" in w:
                string(w["reason"], f"{p}.reason")


def _check_plan_measured(m: Any) -> None:
    obj(m, "measured", (), ("rel_l2", "cosine", "calibration_batches", "holdout_rel_l2",
                            "holdout_batches", "attention_speedup", "timed_sites"))
    if m.get("attention_speedup") is not None:
        number(m["attention_speedup"], "measured.attention_speedup", 0.0)
    for k in ("rel_l2", "holdout_rel_l2"):
        if m.get(k) is not None:
            error_value(m[k], f"measured.{k}")
    if m.get("cosine") is not None:
        number(m["cosine"], "measured.cosine", -1.001, 1.001)
    for k in ("calibration_batches", "holdout_batches", "timed_sites"):
        if m.get(k) is not None:
            integer(m[k], f"measured.{k}", 0, MAX_ITEMS)


def _check_choice(c: Any, p: str, policy: str) -> None:
    obj(c, p, _CHOICE, _CHOICE_OPT)
    exact = boolean(c["exact"], f"{p}.exact")
    name = string(c["name"], f"{p}.name", 1000, nonempty=True, plain=True)
    prefix = "exact:" if exact else "approx:"
    if not name.startswith(prefix):
        raise bad(f"{p}.name", f"{_short(name)} does not start with {prefix!r} (exact is "
                               f"{'true' if exact else 'false'})")
    if policy == "exact" and not exact:
        raise bad(f"{p}.exact", "false (an approximate choice) in a plan with policy 'exact'")
    family = choice_of(c["family"], f"{p}.family", FAMILIES)
    q_tile = int_list(c["q_tile"], f"{p}.q_tile", 1, MAX_TILE)
    kv_tile = int_list(c["kv_tile"], f"{p}.kv_tile", 1, MAX_TILE)
    lay = c.get("layout")
    win = c.get("window")
    heads = c.get("heads")
    leading = integer(c.get("leading", 0), f"{p}.leading", 0, MAX_EXTENT)
    trailing = integer(c.get("trailing", 0), f"{p}.trailing", 0, MAX_EXTENT)
    if not exact and lay is None:
        raise bad(f"{p}.exact", "false, but only GNA layouts are approximate (no layout given)")
    if lay is not None:
        if family != "block_sparse_gna":
            raise bad(f"{p}.layout", f"a layout needs family 'block_sparse_gna', not {family!r}")
        _check_layout(lay, f"{p}.layout")
        n = len(lay["shape"])
        for key, t in (("q_tile", q_tile), ("kv_tile", kv_tile)):
            if len(t) != n:
                raise bad(f"{p}.{key}", f"{len(t)} entries for a {n}-D layout")
    elif family == "block_sparse_gna":
        raise bad(f"{p}.layout", "family 'block_sparse_gna' needs a layout")
    elif leading:
        raise bad(f"{p}.leading", "leading tokens need a layout")
    elif trailing:
        raise bad(f"{p}.trailing", "trailing tokens need a layout")
    if win is not None:
        if family != "sliding_window":
            raise bad(f"{p}.window", f"a window needs family 'sliding_window', not {family!r}")
        if not isinstance(win, (list, tuple)) or len(win) != 2:
            raise bad(f"{p}.window", f"must be [left, right], got {_short(win)}")
        for j, v in enumerate(win):
            if v is not None:
                integer(v, f"{p}.window[{j}]", 0, MAX_EXTENT)
    elif family == "sliding_window":
        raise bad(f"{p}.window", "family 'sliding_window' needs a window [left, right]")
    if heads is not None:
        if exact:
            raise bad(f"{p}.heads", "per-head choices are approximate (exact is true)")
        hs = int_list(heads, f"{p}.heads", 0, MAX_HEADS - 1, 1, MAX_HEADS)
        if len(set(hs)) != len(hs):
            raise bad(f"{p}.heads", "lists a head twice")
    if c.get("predicted") is not None:
        pr = obj(c["predicted"], f"{p}.predicted", (), _CAND_PREDICTED)
        for k, v in pr.items():
            if k == "bound":
                string(v, f"{p}.predicted.bound", 100)
            else:
                number(v, f"{p}.predicted.{k}", 0.0)


# ---- a site's token layout (planner/layout.py) -------------------------------------------------

MAX_SEGMENTS = 64
LAYOUT_SOURCES = ("inferred", "given")


def check_one_grid(kinds: Sequence[str], shown: Sequence[str], fail) -> None:
    """A given layout holds exactly one grid; raise fail(why) otherwise (a global between two
    grids is named as such)."""
    grids = [i for i, k in enumerate(kinds) if k == "grid"]
    if not grids:
        raise fail("no grid segment (e.g. text:512,grid:64x64 or cls:1,grid:32x32,reg:4)")
    if len(grids) > 1:
        middle = [shown[i] for i in range(grids[0] + 1, grids[-1]) if kinds[i] != "grid"]
        why = (f"global segment {middle[0]} sits between two grids" if middle
               else f"{len(grids)} grid segments")
        raise fail(f"{why}: a layout holds one grid, with global segments before and after it only "
                   "(the kernels keep global tokens at the ends; permuting tokens is not built)")


def _segment_text(s: dict) -> str:
    if s["kind"] == "grid":
        return "grid:" + "x".join(map(str, s["shape"]))
    return f"{s.get('name', 'global')}:{s['tokens']}"


def check_token_layout(d: Any, path: str) -> int:
    """A site's token layout {"source", "segments"}: kinds, sizes in range, at least one grid (one
    when given); returns its token count. BadPlan naming the bad field otherwise."""
    obj(d, path, ("source", "segments"))
    source = choice_of(d["source"], _join(path, "source"), LAYOUT_SOURCES)
    segs = d["segments"]
    if not isinstance(segs, (list, tuple)):
        raise bad(_join(path, "segments"), f"must be a list, got {_tname(segs)}")
    if not 1 <= len(segs) <= MAX_SEGMENTS:
        raise bad(_join(path, "segments"), f"{len(segs)} segments, must have 1 to {MAX_SEGMENTS}")
    total = 0
    for i, s in enumerate(segs):
        p = f"{_join(path, 'segments')}[{i}]"
        if not isinstance(s, dict):
            raise bad(p, f"must be an object, got {_tname(s)}")
        kind = choice_of(s.get("kind"), f"{p}.kind", ("grid", "global"))
        if kind == "grid":
            obj(s, p, ("kind", "shape"), ("name", "tokens"))
            shape = int_list(s["shape"], f"{p}.shape", 1, MAX_EXTENT)
            n = math.prod(shape)
            if "tokens" in s and integer(s["tokens"], f"{p}.tokens", 1, MAX_TOKENS) != n:
                raise bad(f"{p}.tokens", f"{s['tokens']}, but grid {'x'.join(map(str, shape))} "
                                         f"holds {n} tokens")
        else:
            obj(s, p, ("kind", "tokens"), ("name",))
            n = integer(s["tokens"], f"{p}.tokens", 1, MAX_EXTENT)
        if "name" in s:
            string(s["name"], f"{p}.name", 64, nonempty=True, plain=True)
        total += n
    if total > MAX_TOKENS:
        raise bad(_join(path, "segments"), f"{total} tokens (at most {MAX_TOKENS})")
    kinds = [s["kind"] for s in segs]
    if source == "given":
        def fail(why: str) -> BadPlan:
            return bad(_join(path, "segments"), why)
        check_one_grid(kinds, [_segment_text(s) for s in segs], fail)
    elif "grid" not in kinds:
        raise bad(_join(path, "segments"), "no grid segment (a layout needs one)")
    return total


def layout_parts(d: dict) -> tuple[list[int], int, int]:
    """(main grid shape, tokens before it, tokens after it) of a checked token layout's JSON: the
    main grid is the largest, the first of equals (TokenGrid.from_segments's rule)."""
    segs = d["segments"]
    sizes = [math.prod(s["shape"]) if s["kind"] == "grid" else s["tokens"] for s in segs]
    grids = [i for i, s in enumerate(segs) if s["kind"] == "grid"]
    m = max(grids, key=lambda i: (sizes[i], -i))
    return list(segs[m]["shape"]), sum(sizes[:m]), sum(sizes[m + 1:])


def layout_applies(choice: dict, token_layout: Any) -> bool:
    """Whether an approximate GNA choice takes its grid and global tokens from the site's token
    layout: non-causal choices always; causal ones (sinks, then a 1-D window) only from a given
    layout (an inferred grid does not describe a causal LM's sequence)."""
    lay = choice.get("layout")
    return (token_layout is not None and lay is not None and not choice.get("exact", True)
            and (not any(lay.get("causal", ())) or token_layout.get("source") == "given"))


def _check_choice_on_layout(c: dict, tl: Any, p: str) -> None:
    """An approximate choice agrees with its site's token layout: the same grid, and leading /
    trailing (when written) the tokens before / after it."""
    if not layout_applies(c, tl):
        return
    shape, before, after = layout_parts(tl)
    shown = ",".join(_segment_text(s) for s in tl["segments"])
    if list(c["layout"]["shape"]) != shape:
        raise bad(f"{p}.layout.shape", f"{'x'.join(map(str, c['layout']['shape']))}, but the site's "
                                       f"token_layout ({shown}) has grid {'x'.join(map(str, shape))}")
    for key, want, where in (("leading", before, "before"), ("trailing", after, "after")):
        if key in c and c[key] != want:
            raise bad(f"{p}.{key}", f"{c[key]}, but the site's token_layout ({shown}) has {want} "
                                    f"global tokens {where} its grid: make them agree, or delete "
                                    "the choice's leading and trailing to take the layout's")


def _check_layout(lay: Any, p: str) -> None:
    obj(lay, p, _LAYOUT)
    shape = int_list(lay["shape"], f"{p}.shape", 1, MAX_EXTENT)
    n = len(shape)
    if math.prod(shape) > MAX_TOKENS:
        raise bad(f"{p}.shape", f"{'x'.join(map(str, shape))} is more than {MAX_TOKENS} tokens")
    window = int_list(lay["window"], f"{p}.window", 1, MAX_EXTENT, n, n)
    stride = int_list(lay["stride"], f"{p}.stride", 1, MAX_EXTENT, n, n)
    dilation = int_list(lay["dilation"], f"{p}.dilation", 1, MAX_EXTENT, n, n)
    causal = lay["causal"]
    if not isinstance(causal, (list, tuple)) or len(causal) != n:
        raise bad(f"{p}.causal", f"must be a list of {n} booleans, got {_short(causal)}")
    for i, v in enumerate(causal):
        boolean(v, f"{p}.causal[{i}]")
    for i in range(n):
        if window[i] * dilation[i] > shape[i]:
            what = "window" if dilation[i] == 1 else "window x dilation"
            raise bad(f"{p}.window[{i}]", f"{what} {window[i] * dilation[i]} exceeds the grid "
                                          f"extent {shape[i]} in dimension {i}")
        if stride[i] > window[i]:
            raise bad(f"{p}.stride[{i}]", f"stride {stride[i]} exceeds the window {window[i]} "
                                          f"in dimension {i} (1 <= stride <= window)")


# ---- a plan against the model it is applied to ---------------------------------------------------

def check_plan_fits(plan: Any, sites: Sequence[Any]) -> None:
    """Every choice of `plan` fits the site it names in the model's `sites`; BadPlan naming the
    field otherwise. Checked before any choice is spliced."""
    from attnopt.cost.roofline import resolve_dims
    from attnopt.cost.variants import describe_layout, implied_layout

    by = {s.name: s for s in sites}
    for i, sp in enumerate(plan.sites):
        p = f"sites[{i}]"
        site = by.get(sp.site)
        if site is None:
            known = ", ".join(list(by)[:8]) + (", ..." if len(by) > 8 else "")
            raise bad(f"{p}.site", f"the model has no attention site {sp.site!r} "
                                   f"(its sites: {known or 'none'})")
        tl = getattr(sp, "token_layout", None)
        if tl is not None and isinstance(site.spec.q_len, int) and tl.tokens != site.spec.q_len:
            raise bad(f"{p}.token_layout.segments", f"{tl.describe()} adds up to {tl.tokens} tokens, "
                                                    f"but site {sp.site!r} has {site.spec.q_len}")
        c = sp.choice
        if c is None:
            continue
        v = c.variant
        if v.layout is None and c.window is None and not c.heads:
            continue  # the site's own kernel: nothing to fit
        try:
            d = resolve_dims(site.spec)
        except ValueError:
            raise bad(f"{p}.choice", f"site {sp.site!r} has symbolic sizes: a plan cannot give "
                                     "it a layout, window or heads") from None
        H, KVH, sq, skv = d["num_heads"], d["num_kv_heads"], d["q_len"], d["kv_len"]
        if v.layout is not None:
            lay = v.layout
            n = math.prod(lay.shape) + c.leading + c.trailing
            if n != sq or n != skv:
                raise bad(f"{p}.choice.layout.shape",
                          f"grid {'x'.join(map(str, lay.shape))}"
                          + (f" + {c.leading} leading" if c.leading else "")
                          + (f" + {c.trailing} trailing" if c.trailing else "")
                          + f" covers {n} tokens, but site {sp.site!r} has {sq} queries and "
                            f"{skv} keys")
            if v.exact and lay != implied_layout(site.spec):
                raise bad(f"{p}.choice.exact", f"true, but {describe_layout(lay)} is not the "
                                               f"sparsity the mask of site {sp.site!r} implies "
                                               "(an approximation must say exact: false)")
        if c.window is not None:
            m = site.spec.mask
            if not (m.kind == "sliding_window" and tuple(c.window) == (m.left, m.right)):
                raise bad(f"{p}.choice.window", f"{list(c.window)} is not the sliding window of "
                                                f"site {sp.site!r} (mask {m.describe()})")
        if c.heads:
            bad_h = [h for h in c.heads if not 0 <= h < H]
            if bad_h:
                raise bad(f"{p}.choice.heads", f"head {bad_h[0]} is out of range: site "
                                               f"{sp.site!r} has {H} heads")
            if KVH <= 0 or H % KVH:
                raise bad(f"{p}.choice.heads", f"site {sp.site!r} has {H} heads over {KVH} KV heads")
            g = H // KVH
            sel = set(c.heads)
            for grp in range(KVH):
                members = set(range(grp * g, (grp + 1) * g))
                if sel & members and not members <= sel:
                    raise bad(f"{p}.choice.heads", f"heads {sorted(sel & members)} split KV group "
                                                   f"{grp} (heads {grp * g}-{(grp + 1) * g - 1}): "
                                                   "choose whole groups")
