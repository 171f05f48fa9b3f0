"""Measured choice among kernel configurations, remembered in memory and on disk.

Used by the generated Triton kernels (tile config per spec/variant/device) and by the exact CPU GNA
kernel (Q tile per layout/shape/thread count). A choice is keyed by a JSON-able dict; the first
process that needs it times every candidate and writes the winner, later processes read it.
Sequence lengths enter keys bucketed (`bucket`: next power of two), so a growing KV cache does not
retune every step.

Cache layout ($ATTNOPT_CACHE_DIR or ~/.cache/attnopt, then <subdir>/):
  tune-<key hash>.json   {"key": ..., "config": <encoded winner>, "timings_ms": [[ms, <encoded>], ...]}
Files are written to a temporary name and renamed, so a reader never sees a partial file. An entry
is data from disk, read under attnopt.util.cache's rules (this user's file, size-capped, plain JSON)
and type-checked here: anything unreadable, stale or malformed is ignored and the choice
re-measured; where the cache cannot be used the choice is simply not remembered.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Sequence, TypeVar

from attnopt.util import cache

T = TypeVar("T")


def enabled() -> bool:
    """Whether kernels may time their candidates (ATTNOPT_AUTOTUNE=0 takes the first one)."""
    return os.environ.get("ATTNOPT_AUTOTUNE", "1").lower() not in ("0", "false", "no", "off")


def bucket(n: int) -> int:
    """A sequence length as tuning keys see it: the next power of two, at least 16 (0 stays 0).
    A KV cache growing one token per decode step then maps to one key per doubling, so a model
    tunes a handful of times instead of every step; within a bucket the best tile config barely
    moves (configs differ by how they cut the work, not by the exact length)."""
    n = int(n)
    return 0 if n <= 0 else max(16, 1 << (n - 1).bit_length())


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def fastest(key: dict, candidates: Sequence[T], bench: Callable[[T], float], *, subdir: str,
            encode: Callable[[T], Any], decode: Callable[[Any], T], memo: dict[str, T]) -> T:
    """The candidate with the least `bench(candidate)` seconds for `key`: from `memo`, then from
    disk, then measured. A candidate whose bench raises is skipped (it cannot run here); when none
    runs, the first error is raised. A remembered choice that is no longer a candidate is ignored."""
    h = key_hash(key)
    if h in memo:
        return memo[h]
    d = cache.directory(subdir)
    path = None if d is None else d / f"tune-{h}.json"
    entry = None if path is None else cache.read_json(path)
    if isinstance(entry, dict) and "config" in entry:
        try:  # the equal candidate itself is returned: (8.0,) == (8,), but only ints are tiles
            choice = candidates[list(candidates).index(decode(entry["config"]))]
        except Exception:  # noqa: BLE001  whatever the file holds, it is only a miss
            choice = None
        if choice is not None:
            memo[h] = choice
            return choice
    timings, errors = [], []
    for cand in candidates:
        try:
            timings.append((bench(cand), cand))
        except Exception as e:  # noqa: BLE001  a candidate that cannot run is not a candidate
            errors.append(f"{cand}: {type(e).__name__}: {str(e).strip().splitlines()[-1:] or ''}")
    if not timings:
        raise RuntimeError(f"no candidate ran for this kernel; first error: {errors[0]}")
    best = min(timings, key=lambda x: x[0])[1]
    if path is not None:
        cache.store(path, json.dumps({"key": key, "config": encode(best),
                                      "timings_ms": [[t * 1e3, encode(c)] for t, c in timings]},
                                     indent=1, default=str))
    memo[h] = best
    return best
