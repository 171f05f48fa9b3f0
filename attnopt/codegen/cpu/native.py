"""The compiled inner loop of the exact CPU tile kernels (cpu_tiles.c): attention of a tile plan, fp32.
The same library holds the tile backward (attnopt_tiles_backward_f32), called by native_backward.py.

Canonical layouts: q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv] fp32 (any strides, unit stride
in the last dim; callers convert fp16/bf16), out [B, H, Sq, Dv] fp32; a plan's q_idx [n, TQ], kv_idx
[n, TK], mask [n, TQ, TK] (True = attend); the caller's attn_mask broadcastable to [B, H, Sq, Skv], bool
or additive, read in place.

Why not SDPA per tile group: SDPA's CPU kernel cuts a 64-query tile into 32-query blocks and feeds each to
library GEMMs; on the 64x64-token / 16x16-window GNA layout that ran at ~80 GFLOP/s where dense SDPA runs
at ~130 (2-core EPYC), plus ~5 ms a call of gathering tiles and scattering rows. This kernel reads q, k, v
in place through the plan's indices, keeps a tile's scores in cache and writes output rows directly.

Build: the C file is compiled on first use with the system C compiler ($CC, else cc) for this machine
(-O3 -march=native -fopenmp), into $ATTNOPT_CACHE_DIR/native/ under a name keyed by the source, the
compiler's version, the flags and the CPU, so a later process loads it at once. A cached library is
code this process runs: it is loaded only under attnopt.util.cache's trust model (this user's files,
the SHA-256 recorded at build time), else rebuilt, or built privately where the cache cannot be used.
Without a compiler, when the build fails, or with ATTNOPT_CPU_NATIVE=0, `available()` is False and the
caller runs its SDPA path (the reason is logged once).
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import logging
import platform
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from attnopt.util import cache, toolchain

log = logging.getLogger("attnopt.codegen.cpu.native")

SOURCE = Path(__file__).with_name("cpu_tiles.c")
# Tried in order: the first set the compiler accepts is used (-march=native is not known everywhere).
# With -fopenmp the library's NEEDED libgomp.so.1 resolves to the copy torch already loaded (same
# soname), so the kernel runs on torch's OpenMP threads: a second pool of Python threads fought torch's
# spinning OpenMP workers for the cores (measured: 24-30 ms a call instead of 17, 2-core EPYC).
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])
COMMON_FLAGS = ["-std=gnu11", "-fPIC", "-shared", "-fno-math-errno"]
Q_PAD = 16  # the kernel's query panels are 16 wide
_LOCK = threading.Lock()


enabled = toolchain.native_enabled
_compiler = toolchain.c_compiler


_CPUINFO_FIELDS = ("model name", "flags", "Features")  # Features: the flags line on ARM


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first value of each of _CPUINFO_FIELDS in /proc/cpuinfo (empty where there is none)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in _CPUINFO_FIELDS and key not in found:
                    found[key] = value.strip()
    except OSError:
        pass
    return found


def _cpu_identity() -> str:
    """The machine the build is for: -march=native code from another CPU (a home directory shared
    across a cluster) could stop this one with an illegal instruction, so the cache key holds the
    CPU's model and feature flags."""
    info = cpuinfo()
    return "\n".join([platform.machine(), platform.processor()] + [f"{k}: {info[k]}" for k in sorted(info)])


def library_names(cc: str) -> list[tuple[list[str], str]]:
    """(flags, cache file name) of each build of cpu_tiles.c, in FLAG_SETS order: the name is keyed by
    the source, the compiler's version, the flags and the CPU. Raises RuntimeError."""
    src = SOURCE.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cc} --version failed: {e}") from e
    machine = _cpu_identity().encode()
    out = []
    for flags in FLAG_SETS:
        tag = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(flags + COMMON_FLAGS).encode(),
                                         machine])).hexdigest()[:20]
        out.append((flags, f"cpu_tiles-{tag}.so"))
    return out


class _BuildFailed(Exception):
    pass


def _compile(cc: str, flags: list[str], out: Path) -> None:
    cmd = [cc, *flags, *COMMON_FLAGS, "-o", str(out), str(SOURCE)]
    started = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{' '.join(cmd)}: {e}") from e
    if res.returncode != 0:
        raise _BuildFailed((res.stderr.strip().splitlines() or ["failed"])[-1])
    log.info("built the native CPU tile kernel in %.1f s (%s)", time.perf_counter() - started, " ".join(flags))


def _open(path: Path) -> ctypes.CDLL:
    """dlopen the library and look up its entry points (OSError / AttributeError: not our library)."""
    lib = ctypes.CDLL(str(path))
    lib.attnopt_tiles_f32, lib.attnopt_tiles_parallel, lib.attnopt_tiles_backward_f32  # noqa: B018  raise here
    return lib


def _load(cc: str) -> ctypes.CDLL:
    """The cached build of cpu_tiles.c when the cache may be trusted with it (attnopt.util.cache),
    else a fresh build; raises RuntimeError / OSError with the reason. A cached file that does not
    load (corrupt, not a library) is rebuilt over, not skipped forever."""
    errors = []
    for flags, name in library_names(cc):
        hit = cache.cached_artifact("native", name)
        if hit is not None:
            try:
                return _open(hit)
            except (OSError, AttributeError) as e:
                cache.warn_once(f"attnopt: the cached {hit} does not load ({e}); it is rebuilt")
        try:
            path = cache.build_artifact("native", name, lambda tmp, flags=flags: _compile(cc, flags, tmp))
        except _BuildFailed as e:
            errors.append(str(e))
            continue
        try:
            return _open(path)
        except AttributeError as e:
            raise RuntimeError(f"the fresh build {path} lacks {e}") from e
        finally:
            cache.discard_private(path)  # built outside the cache: nothing to keep once mapped
    raise RuntimeError(f"{cc} could not build {SOURCE.name}: {errors[0]}")


@functools.cache
def _library() -> ctypes.CDLL | None:
    if not enabled():
        log.info("native CPU tile kernel off (ATTNOPT_CPU_NATIVE=0); using SDPA per tile group")
        return None
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler ($CC or cc) found: the exact CPU tile kernels use SDPA per tile group")
        return None
    try:
        with _LOCK:
            lib = _load(cc)
    except (RuntimeError, OSError) as e:
        log.warning("native CPU tile kernel unavailable (%s): using SDPA per tile group", e)
        return None
    fn = lib.attnopt_tiles_f32
    P, I = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [P, P, P, P, I, I, I, I, I, P, P, P, P, P, I, P, I, P, I, P, P, ctypes.c_int, P,
                   ctypes.c_float, I, I, ctypes.c_int]
    fn.restype = ctypes.c_int
    lib.attnopt_tiles_parallel.restype = ctypes.c_int
    bwd = lib.attnopt_tiles_backward_f32  # native_backward.py calls it
    bwd.argtypes = [P, P, P, P, P, P, P, I, I, I, I, I, I, I, P, P, P, P, P, I, I, P, I, P, I, P, P,
                    ctypes.c_int, P, ctypes.c_float, ctypes.c_int]
    bwd.restype = ctypes.c_int
    lib.parallel = bool(lib.attnopt_tiles_parallel())
    return lib


def available() -> bool:
    return _library() is not None


def expected() -> bool:
    """Whether the kernel should be available here (switched on, a compiler present), without
    building it: for cost models that must not compile anything."""
    return toolchain.native_kernel_expected()


def can_run(q: Tensor, k: Tensor, v: Tensor, requires_grad: bool,
            attn_mask: Tensor | None = None) -> tuple[bool, str]:
    """Whether the native kernel takes these inputs (the caller has already checked the attention's
    own options: softmax, no softcap)."""
    if attn_mask is not None and not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        return False, f"mask dtype {attn_mask.dtype}"
    if attn_mask is not None and type(attn_mask) is not Tensor:
        return False, "mask is a tensor subclass"
    if requires_grad:
        return False, "inputs need gradients (this entry is forward only; native_backward.can_run pairs it with the backward)"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False, f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (the kernel computes fp32; fp16/bf16 are converted)"
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor:
        return False, "tensor subclass"
    if v.shape[3] % 8:
        return False, f"value head dim {v.shape[3]} is not a multiple of 8"
    if any(x.stride(3) != 1 for x in (q, k, v)):
        return False, "last dim not contiguous"
    if not available():
        return False, "not built here"
    return True, ""


_POOL: list = [None, 0]


def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """Python threads for a library built without OpenMP (ctypes drops the GIL while C runs)."""
    if _POOL[0] is None or _POOL[1] != threads:
        if _POOL[0] is not None:
            _POOL[0].shutdown(wait=False)
        _POOL[0] = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="attnopt-cpu")
        _POOL[1] = threads
    return _POOL[0]


class NativeTiles:
    """A tile plan's index arrays in the form the kernel reads (contiguous int64 / uint8)."""

    def __init__(self, q_idx: Tensor, kv_idx: Tensor, mask: Tensor):
        self.n, self.TQ = (int(x) for x in q_idx.shape)
        self.TK = int(kv_idx.shape[1])
        self.TQp = -(-self.TQ // Q_PAD) * Q_PAD
        self.q_idx = q_idx.contiguous().to(torch.int64)
        self.kv_idx = kv_idx.contiguous().to(torch.int64)
        keys_major = torch.zeros((self.n, self.TK, self.TQp), dtype=torch.uint8)
        keys_major[:, :, :self.TQ] = mask.transpose(1, 2).to(torch.uint8) * 255
        self.mask = keys_major
        # The first tile holding a query writes its row (shifted border tiles overlap a neighbour).
        flat = self.q_idx.reshape(-1).numpy()
        owner = np.zeros(flat.shape, dtype=np.uint8)
        owner[np.unique(flat, return_index=True)[1]] = 1
        self.owner = torch.from_numpy(owner)


def _user_mask(attn_mask: Tensor | None, B: int, H: int, Sq: int, Skv: int):
    """(pointer, is_float, strides, keep-alive) of the caller's mask as the kernel reads it: bool bytes or
    fp32 values, broadcast dims at stride 0."""
    if attn_mask is None:
        return None, 0, (ctypes.c_int64 * 4)(0, 0, 0, 0), None
    m = attn_mask if attn_mask.dtype in (torch.bool, torch.float32) else attn_mask.float()
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(B, H, Sq, Skv)
    return m.data_ptr(), int(m.dtype == torch.float32), (ctypes.c_int64 * 4)(*m.stride()), m


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float | None, tiles: NativeTiles, out: Tensor,
           attn_mask: Tensor | None = None) -> None:
    """out[b, h, q_idx[t]] = attention of each tile over its keys (see cpu_tiles.c), for every tile;
    `attn_mask` (broadcastable to [B, H, Sq, Skv], bool or additive) as in SDPA."""
    lib = _library()
    fn = lib.attnopt_tiles_f32
    B, H, Sq, D = q.shape
    um, um_float, ums, _keep = _user_mask(attn_mask, B, H, Sq, k.shape[2])
    Hkv, Dv = k.shape[1], v.shape[3]
    scale = float(D ** -0.5 if scale is None else scale)
    strides = [(ctypes.c_int64 * 3)(*x.stride()[:3]) for x in (q, k, v, out)]
    work = tiles.n * B * Hkv
    if work == 0:
        return
    threads = max(1, min(torch.get_num_threads(), work))

    def run(lo: int, hi: int, inner_threads: int = 1) -> int:
        return fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, H, Hkv, D, Dv,
                  *(ctypes.addressof(s) for s in strides), tiles.q_idx.data_ptr(), tiles.TQ,
                  tiles.kv_idx.data_ptr(), tiles.TK, tiles.mask.data_ptr(), tiles.TQp,
                  tiles.owner.data_ptr(), um, um_float, ctypes.addressof(ums), scale, lo, hi, inner_threads)

    if lib.parallel or threads == 1:
        codes = [run(0, work, threads)]
    else:
        # the calling thread takes the first range itself: one thread hand-off fewer per call
        bounds = [work * i // threads for i in range(threads + 1)]
        futures = [_pool(threads - 1).submit(run, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])]
        codes = [run(bounds[0], bounds[1])] + [f.result() for f in futures]
    if any(codes):
        raise RuntimeError(f"native CPU tile kernel failed (codes {codes})")
