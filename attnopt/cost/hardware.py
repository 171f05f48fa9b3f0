"""Device profiles for the cost model, and the literal tile tables shared with the simulator
and the autotuner.

Conventions: rates are per second in base units (FLOP/s, B/s, exp/s); `peak_flops` is the
dense (no 2:4 sparsity) tensor-core rate per dtype key "bf16" | "fp16" | "fp32" ("fp32" is the
plain CUDA-core rate, because attention kernels do not run fp32 on tensor cores). Tile shapes
are token counts: 1-D tiles (n,), 2-D / 3-D tiles are boxes of the token grid.

Sources (public spec sheets and papers; figures as used below):
  * H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet: 989.4 TFLOP/s dense BF16/FP16,
    67 TFLOP/s FP32, 3.35 TB/s HBM3, 132 SMs.
  * H200 SXM: NVIDIA H200 datasheet: same compute as H100 SXM, 4.8 TB/s HBM3e, 141 GB.
  * A100 SXM4 80GB: NVIDIA A100 datasheet: 312 TFLOP/s dense BF16/FP16, 19.5 TFLOP/s FP32,
    2.039 TB/s HBM2e, 108 SMs.
  * B200: NVIDIA HGX B200 / DGX B200 material: ~2.25 PFLOP/s dense FP16/BF16 per GPU
    (4.5 with sparsity), 8 TB/s HBM3e, 148 SMs; FP32 ~80 TFLOP/s (approximate, not verified
    against a per-SKU datasheet).
  * Exp (MUFU) throughput: FlashAttention-3 paper (Shah et al. 2024, sec. 3.1): "H100 SXM5 has
    989 TFLOPS of FP16 matmul but only 3.9 TFLOPS of special functions". Other GPUs derived
    the same way: 16 MUFU results/clock/SM (CUDA C Programming Guide, arithmetic instruction
    throughput table) x SMs x boost clock (A100 1.41 GHz, B200 ~1.96 GHz, assumed).
  * Attention matmul efficiency (fraction of peak a tuned FlashAttention kernel's GEMMs
    reach): FA3 paper reports up to ~740 TFLOP/s FP16 forward on H100 SXM (75%); FA2 paper
    reports 50-73% of peak on A100 forward; for B200 0.70 is an assumption (FlashAttention-4 /
    cuDNN reports are in the 1.5-1.6 PFLOP/s range).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from attnopt.util import cache, toolchain

# Literal tile tables: per GPU family, the Q and KV tile shapes a kernel is compiled for.
# Keys: "q_1d"/"kv_1d" (runs of the flattened sequence), "q_2d"/"kv_2d", "q_3d"/"kv_3d" (boxes).
# Blackwell's FMHA uses 256-token Q tiles and 128-token KV tiles (the GNA paper's FLUX
# configuration Q 16x16 / KV 16x8); Hopper and Ampere kernels use 64/128-token tiles.
_SM80_SM90_TILES: dict[str, tuple[tuple[int, ...], ...]] = {  # Ampere and Hopper: the same set
    "q_1d": ((64,), (128,)),
    "kv_1d": ((64,), (128,)),
    "q_2d": ((8, 8), (16, 8), (8, 16)),
    "kv_2d": ((8, 8), (16, 8), (8, 16)),
    "q_3d": ((4, 4, 4), (4, 4, 8), (2, 8, 8), (4, 8, 4)),
    "kv_3d": ((4, 4, 4), (4, 4, 8), (2, 8, 8), (4, 8, 4)),
}
TILE_TABLES: dict[str, dict[str, tuple[tuple[int, ...], ...]]] = {
    "ampere": dict(_SM80_SM90_TILES),
    "hopper": dict(_SM80_SM90_TILES),
    "blackwell": {
        "q_1d": ((128,), (256,)),
        "kv_1d": ((128,),),
        "q_2d": ((16, 16), (16, 8), (8, 16), (32, 8), (8, 32)),
        "kv_2d": ((16, 8), (8, 16)),
        "q_3d": ((4, 8, 8), (2, 8, 16), (4, 4, 16), (4, 4, 8), (2, 8, 8), (4, 8, 4)),
        "kv_3d": ((4, 4, 8), (2, 8, 8), (4, 8, 4)),
    },
    # Triton interpreter (TRITON_INTERPRET=1, CI without a GPU): one config per shape, tiles
    # of 64 tokens or less, because each inner-loop step costs ~10 ms there (docs/FACTS.md).
    "interpreter": {
        "q_1d": ((64,), (32,)),
        "kv_1d": ((64,), (32,)),
        "q_2d": ((8, 8),),
        "kv_2d": ((8, 8),),
        "q_3d": ((4, 4, 4),),
        "kv_3d": ((4, 4, 4),),
    },
    "cpu": {
        "q_1d": ((32,), (64,), (128,)),
        "kv_1d": ((32,), (64,), (128,)),
        "q_2d": ((8, 8), (16, 8), (8, 16)),
        "kv_2d": ((8, 8), (16, 8), (8, 16)),
        "q_3d": ((4, 4, 4), (4, 4, 8), (2, 8, 8), (4, 8, 4)),
        "kv_3d": ((4, 4, 4), (4, 4, 8), (2, 8, 8), (4, 8, 4)),
    },
}


# Layout classes a sparse kernel's measured efficiency is kept for: the causal sliding window
# (1-D band; a 1-D GNA layout is one too) and 2-D / 3-D GNA (box tiles or runs on the grid).
SPARSE_CLASSES = ("window_1d", "gna_2d", "gna_3d")


def sparse_class(family: str, ndim: int = 1) -> str:
    """The SPARSE_CLASSES entry of a sparse variant (family, its layout's grid dimensions)."""
    if family == "sliding_window" or ndim <= 1:
        return "window_1d"
    return "gna_2d" if ndim == 2 else "gna_3d"


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    family: str                    # key into TILE_TABLES
    peak_flops: dict[str, float]   # dense tensor-core FLOP/s by dtype ("fp32": CUDA cores)
    alu_flops: float               # FP32 CUDA-core FLOP/s (softmax bookkeeping, masks)
    mem_bw: float                  # B/s, spec sheet
    num_sms: int                   # SMs (CPU: cores)
    sfu_exp_per_s: float           # exp results per second
    mma_efficiency: float          # fraction of peak a tuned attention kernel's GEMMs reach
    mem_efficiency: float = 0.85   # achievable fraction of spec bandwidth (streaming kernels)
    sfu_overlap: float = 0.5       # fraction of softmax time hidden under the GEMMs
    launch_overhead_s: float = 5e-6
    source: str = "spec sheet"
    # Fraction of the dense kernel's per-tile rate a sparse kernel's visited tiles run at, per
    # layout class (SPARSE_CLASSES; "default" for the rest); 1.0 where unmeasured. Hopper: fitted
    # to the recorded H100 run (HOPPER_SPARSE below). CPU (2-core EPYC, RESULTS.md): the compiled
    # tile kernel (codegen/cpu_native) 73-89% on 2-D GNA and ~100% of the work bound on causal
    # windows; its fallback, SDPA on gathered tiles, 46-65%.
    sparse_efficiency: Mapping[str, float] = field(default_factory=dict)
    # Fixed time one program (one Q tile's CTA) spends on one SM besides its KV tiles: loading Q,
    # the pipeline's fill, normalizing and storing O, at head dims D = Dv = 128 (the cost model
    # scales it by (D + Dv) / 256: all of it moves D-sized rows). 0.0 where unmeasured.
    q_tile_overhead_s: float = 0.0
    # Extra cost of a visited tile that needs an element mask, in tile steps (the GNA kernel
    # recomputes per-dimension coordinates and compares them for every score).
    masked_tile_cost: float = 0.0

    def sparse_efficiency_for(self, cls: str) -> float:
        """The measured sparse efficiency of a layout class (SPARSE_CLASSES)."""
        return float(self.sparse_efficiency.get(cls, self.sparse_efficiency.get("default", 1.0)))

    @property
    def tiles(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        return TILE_TABLES[self.family]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tiles"] = {k: [list(t) for t in v] for k, v in self.tiles.items()}
        return d


def q_tile_cost_steps(hw: HardwareProfile, q_tokens: int, kv_tokens: int, head_dim: int = 128,
                      dtype: str = "bf16") -> float:
    """hw's per-program fixed cost in steps of one (q_tokens x kv_tokens) tile at head_dim (the
    simulator's `q_tile_cost`): the step is the tile's two GEMMs on one SM at the attention rate
    (both scale with the head dim, so the count does not depend on it)."""
    if not hw.q_tile_overhead_s:
        return 0.0
    rate = hw.peak_flops.get(dtype, hw.peak_flops["bf16"]) * hw.mma_efficiency / hw.num_sms
    overhead = hw.q_tile_overhead_s * 2 * head_dim / 256
    return overhead * rate / (2.0 * q_tokens * kv_tokens * 2 * head_dim)


def allowed_tiles(hw: HardwareProfile, ndim: int) -> tuple[tuple[tuple[int, ...], ...],
                                                           tuple[tuple[int, ...], ...]]:
    """(q tiles, kv tiles) the hardware's kernels support for an ndim-D token layout."""
    t = TILE_TABLES[hw.family]
    return t[f"q_{ndim}d"], t[f"kv_{ndim}d"]


# Our Triton kernels on Hopper, fitted to the recorded H100 run (bench/results/
# gpu_kernels_h100_2026-11-23.json; `bench/predictions.py` prints every row's prediction: the 9
# GNA / window rows at 0.88-1.12x of the measured speedup with these figures, 1.07-2.55x without):
#  * per-program fixed cost 2.75 us at D = 128: the 18 dense / causal rows (S 1K-16K: at S=1K,
#    16 KV tiles per program, the kernel ran at 60% of its S=16K rate per tile; the D=64 rows fit
#    it scaled by D) and the 3 sliding-window rows;
#  * masked tile +0.4 tile steps: the stride-1 rows (79%, 53%, 64% of their tiles masked) against
#    their strided, perfectly block-sparse twins of the same layout;
#  * window_1d 1.0: the 3 causal sliding-window rows (S 4K/16K, windows 1K/4K) run at the causal
#    kernel's per-tile rate once the fixed cost is counted (the fit's upper limit);
#  * gna_2d 0.68: the 4 rows 2d_64x64_w16[_s16_blocksparse], 2d_128x128_w32[_s32_blocksparse];
#  * gna_3d 0.74: the 2 rows 3d_16x32x32_w8x16x16[_blocksparse].
# H200 has the same SMs and clocks (only the memory differs), so it shares them. A100 and B200
# are unmeasured: 1.0 and no fixed cost until bench/gpu_kernels.py runs there.
HOPPER_SPARSE_EFFICIENCY = {"window_1d": 1.0, "gna_2d": 0.68, "gna_3d": 0.74}
HOPPER_Q_TILE_OVERHEAD_S = 2.75e-6
HOPPER_MASKED_TILE_COST = 0.4
HOPPER_MEASURED_CLOCK_HZ = 1.98e9  # H100 SXM boost: the fixed cost above is ~5400 cycles

_T = 1e12
H100_SXM = HardwareProfile(
    name="H100 SXM", family="hopper",
    peak_flops={"bf16": 989.4 * _T, "fp16": 989.4 * _T, "fp32": 67 * _T},
    alu_flops=67 * _T, mem_bw=3.35e12, num_sms=132, sfu_exp_per_s=3.9e12,
    mma_efficiency=0.75, sfu_overlap=0.5,  # FA3 ping-pong overlaps softmax with GEMMs
    sparse_efficiency=HOPPER_SPARSE_EFFICIENCY, q_tile_overhead_s=HOPPER_Q_TILE_OVERHEAD_S,
    masked_tile_cost=HOPPER_MASKED_TILE_COST)
H200 = HardwareProfile(
    name="H200 SXM", family="hopper",
    peak_flops={"bf16": 989.4 * _T, "fp16": 989.4 * _T, "fp32": 67 * _T},
    alu_flops=67 * _T, mem_bw=4.8e12, num_sms=132, sfu_exp_per_s=3.9e12,
    mma_efficiency=0.75, sfu_overlap=0.5,
    sparse_efficiency=HOPPER_SPARSE_EFFICIENCY, q_tile_overhead_s=HOPPER_Q_TILE_OVERHEAD_S,
    masked_tile_cost=HOPPER_MASKED_TILE_COST)
A100_SXM = HardwareProfile(
    name="A100 SXM", family="ampere",
    peak_flops={"bf16": 312 * _T, "fp16": 312 * _T, "fp32": 19.5 * _T},
    alu_flops=19.5 * _T, mem_bw=2.039e12, num_sms=108,
    sfu_exp_per_s=16 * 108 * 1.41e9, mma_efficiency=0.72, sfu_overlap=0.3)
B200 = HardwareProfile(
    name="B200", family="blackwell",
    peak_flops={"bf16": 2250 * _T, "fp16": 2250 * _T, "fp32": 80 * _T},
    alu_flops=80 * _T, mem_bw=8.0e12, num_sms=148,
    sfu_exp_per_s=16 * 148 * 1.96e9, mma_efficiency=0.70, sfu_overlap=0.5)

PROFILES: dict[str, HardwareProfile] = {
    "h100": H100_SXM, "h100_sxm": H100_SXM, "h200": H200, "a100": A100_SXM, "a100_sxm": A100_SXM,
    "b200": B200,
}


# ---- local CPU: measured once, cached -----------------------------------------------------

def _cache_path() -> Path | None:
    """Where the measured profile is remembered; None where the cache cannot be used."""
    root = cache.directory()
    return None if root is None else root / "cpu_profile.json"


def best_time(fn, repeats: int = 3) -> float:
    """Least wall time of `repeats` calls of fn, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_cpu() -> dict[str, float]:
    """Measure fp32 matmul FLOP/s, copy bandwidth and exp throughput with numpy (~1 s)."""
    n = 1024
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a  # warm BLAS threads
    flops = 2 * n ** 3 / best_time(lambda: a @ a)
    src = np.ones(16 * 2 ** 20, dtype=np.float32)  # 64 MiB, past the caches
    dst = np.empty_like(src)
    bw = 2 * src.nbytes / best_time(lambda: np.copyto(dst, src))  # read + write
    x = np.linspace(-4, 4, 2 ** 22, dtype=np.float32)
    out = np.empty_like(x)
    exp_rate = x.size / best_time(lambda: np.exp(x, out=out))
    return {"fp32_flops": flops, "mem_bw": bw, "exp_per_s": exp_rate,
            "cores": os.cpu_count() or 1, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def cpu_profile(refresh: bool = False) -> HardwareProfile:
    """The local CPU, measured with numpy once and cached in ~/.cache/attnopt/cpu_profile.json
    (or $ATTNOPT_CACHE_DIR). numpy has no fast bf16/fp16 matmul, so those use the fp32 rate."""
    path = _cache_path()
    m = None if refresh or path is None else cache.read_json(path)
    try:  # data from disk: every field read below must be a finite positive number
        if not (all(0 < float(m[k]) < math.inf for k in ("fp32_flops", "mem_bw", "exp_per_s"))
                and 1 <= float(m["cores"]) < 1 << 20):
            m = None
    except (ValueError, KeyError, TypeError, OverflowError):
        m = None
    if m is None:
        m = measure_cpu()
        if path is not None:
            cache.store(path, json.dumps(m, indent=1))
    f = float(m["fp32_flops"])
    return HardwareProfile(
        name="local CPU", family="cpu", peak_flops={"bf16": f, "fp16": f, "fp32": f},
        alu_flops=f, mem_bw=float(m["mem_bw"]), num_sms=int(m["cores"]),
        sfu_exp_per_s=float(m["exp_per_s"]), mma_efficiency=1.0, mem_efficiency=1.0,
        sfu_overlap=0.0, launch_overhead_s=2e-6, source=f"measured {m.get('measured_at', '')}",
        sparse_efficiency={"default": 0.8 if toolchain.native_kernel_expected() else 0.55})


def profile_for_device(device_name: str | None) -> str:
    """The profile name for an accelerator's name (torch.cuda.get_device_name), or "cpu" when
    there is none or its kind has no profile. The device query itself lives in codegen.device."""
    name = (device_name or "").upper()
    for key in ("H200", "H100", "B200", "A100"):  # H200 before H100: names like "NVIDIA H200"
        if key in name:
            return key.lower()
    return "cpu"


# ---- an unknown CUDA GPU: a profile from its device properties --------------------------------

# Per compute capability: dense FP16/BF16 tensor-core FLOPs per clock per SM with FP32
# accumulation (what attention kernels use), FP32 CUDA-core FLOPs per clock per SM, whether BF16
# runs on the tensor cores, the tile family, and the GEMM efficiency / softmax overlap assumed
# (unmeasured: the datacenter profiles' figures for their generation, 0.6 for the others, an
# assumption). Tensor rates from NVIDIA's whitepapers, checked against datasheets at boost clock:
# V100 125 TF (80 SMs x 1.53 GHz x 1024), T4 65 TF (40 x 1.59 x 1024), A100 312 TF (108 x 1.41
# x 2048), A40 150 TF (84 x 1.74 x 1024), L40S 362 TF (142 x 2.52 x 1024), H100 SXM 989 TF
# (132 x 1.83 x 4096), B200 2.25 PF (148 x 1.86 x 8192), RTX PRO 6000 Blackwell (188 SMs x 1024).
# GeForce boards (Turing, Ampere GA10x, Ada, Blackwell sm_120) run FP32-accumulate MMA at half
# rate (RTX 4090 whitepaper: 165 TF with FP32 accumulate = 128 x 2.52 x 512).
_CC_RATES: dict[tuple[int, int], dict[str, Any]] = {
    (7, 0): dict(tc=1024, fp32=128, bf16=False, family="ampere", eff=0.5, overlap=0.3),
    (7, 5): dict(tc=1024, fp32=128, bf16=False, family="ampere", eff=0.6, overlap=0.3),
    (8, 0): dict(tc=2048, fp32=128, bf16=True, family="ampere", eff=0.72, overlap=0.3),
    (8, 6): dict(tc=1024, fp32=256, bf16=True, family="ampere", eff=0.6, overlap=0.3),
    (8, 9): dict(tc=1024, fp32=256, bf16=True, family="ampere", eff=0.6, overlap=0.3),
    (9, 0): dict(tc=4096, fp32=256, bf16=True, family="hopper", eff=0.75, overlap=0.5),
    (10, 0): dict(tc=8192, fp32=256, bf16=True, family="blackwell", eff=0.70, overlap=0.5),
    (12, 0): dict(tc=1024, fp32=256, bf16=True, family="ampere", eff=0.6, overlap=0.3),
}
_MUFU_PER_CLOCK_SM = 16      # exp results per clock per SM, cc 7.0-10.x (CUDA C Programming Guide)
_FALLBACK_CLOCK_HZ = 1.5e9   # when the driver reports no clock (CUDA 13 dropped clockRate)
_FALLBACK_BW_PER_SM = 10e9   # B/s per SM when it reports no memory clock / bus width (a guess)
CUDA_TARGET = "cuda"         # the profile name of this machine's GPU derived from its properties


def _cc_rates(major: int, minor: int) -> dict[str, Any] | None:
    """The table row for a compute capability: its own, else the newest one of the same major at
    or below it, else the newest of an older major; None before Volta (no tensor cores)."""
    if major < 7:
        return None
    known = sorted(k for k in _CC_RATES if k <= (major, minor))
    return _CC_RATES[known[-1]] if known else None


def profile_from_properties(props: Mapping[str, Any]) -> HardwareProfile | None:
    """A profile for a CUDA GPU from its device properties, a plain dict with the fields of
    torch.cuda.get_device_properties (codegen.device.device_properties): name, major, minor,
    multi_processor_count, clock_rate (kHz), memory_clock_rate (kHz), memory_bus_width (bits).
    Peak rates are per-SM rates of its compute capability x SMs x clock; bandwidth is the memory
    clock x 2 (double data rate) x bus width. None when it has no tensor cores (before sm_70).
    Hopper parts get the figures measured on the H100 (the fixed cost in cycles, at this clock);
    the others' sparse figures are unmeasured."""
    def num(key: str) -> float:
        try:
            v = float(props.get(key) or 0)
        except (TypeError, ValueError):
            return 0.0
        return v if 0 < v < math.inf else 0.0

    major, minor, sms = int(num("major")), int(num("minor")), int(num("multi_processor_count"))
    rates = _cc_rates(major, minor)
    if rates is None or sms < 1:
        return None
    name = str(props.get("name") or "CUDA GPU")
    clock = num("clock_rate") * 1e3 or _FALLBACK_CLOCK_HZ
    bw = 2 * num("memory_clock_rate") * 1e3 * num("memory_bus_width") / 8 or _FALLBACK_BW_PER_SM * sms
    geforce = "GEFORCE" in name.upper()  # half-rate FP32-accumulate MMA (table comment)
    tensor = rates["tc"] / (2 if geforce else 1) * sms * clock
    fp32 = rates["fp32"] * sms * clock
    hopper = rates["family"] == "hopper"
    return HardwareProfile(
        name=f"{name} (sm_{major}{minor}, from device properties)", family=rates["family"],
        peak_flops={"bf16": tensor if rates["bf16"] else fp32, "fp16": tensor, "fp32": fp32},
        alu_flops=fp32, mem_bw=bw, num_sms=sms, sfu_exp_per_s=_MUFU_PER_CLOCK_SM * sms * clock,
        mma_efficiency=rates["eff"], sfu_overlap=rates["overlap"],
        source="device properties x per-SM rates of its compute capability",
        sparse_efficiency=HOPPER_SPARSE_EFFICIENCY if hopper else {},
        q_tile_overhead_s=HOPPER_Q_TILE_OVERHEAD_S * HOPPER_MEASURED_CLOCK_HZ / clock if hopper else 0.0,
        masked_tile_cost=HOPPER_MASKED_TILE_COST if hopper else 0.0)


def register_profile(key: str, profile: HardwareProfile) -> str:
    """Make `profile` known to get_profile under `key` (this process only); returns the key."""
    PROFILES[key] = profile
    return key


def get_profile(name: str) -> HardwareProfile:
    key = name.lower().replace("-", "_").replace(" ", "_")
    if key == "cpu":
        return cpu_profile()
    if key not in PROFILES:
        hint = (" (this machine's CUDA device, derived from its properties by "
                "codegen.device.local_target(); there is none here)" if key == CUDA_TARGET else "")
        raise ValueError(f"unknown hardware {name!r}{hint}; known: {sorted(set(PROFILES) | {'cpu'})}")
    return PROFILES[key]
