"""Cost model and GNA tile simulator (numpy only: no torch, no onnx).

gna (mask semantics), simulator (tile counts and bounds), search (stride/tile search),
hardware (device profiles, tile tables), roofline (estimate()), draw (PNG, matplotlib lazily).
"""
from attnopt.sparsity.gna import dense_mask, key_ranges
from attnopt.cost.hardware import TILE_TABLES, HardwareProfile, allowed_tiles, get_profile
from attnopt.cost.roofline import Estimate, estimate
from attnopt.cost.search import SearchResult, search
from attnopt.sparsity.simulator import SimResult, simulate

__all__ = ["dense_mask", "key_ranges", "TILE_TABLES", "HardwareProfile", "allowed_tiles",
           "get_profile", "Estimate", "estimate", "SearchResult", "search", "SimResult",
           "simulate"]
