"""Graph fuzzer: attention-like programs from a grammar of the real forms, and near misses.

    python -m attnopt.testing.fuzz --cases N --seed S [--kind torch|onnx|both] [--time-limit SECONDS]
                           [--out DIR] [--replay CASE.json] [--jobs N]

Each case is a dict of grammar choices (grammar.py: `sample`), turned into a tiny torch module
(torch_case.py: Python source, traced with torch.fx.symbolic_trace, or captured with
torch.export for a fraction) or an ONNX graph built with onnx.helper (onnx_case.py). The
invariant checked, independently of attnopt's own validator (run.py; fresh random inputs,
padded masks included):

- a positive form must produce a site, and the optimized program must match the original
  (1e-4 relative for fp32, 1e-2 for fp16);
- a near miss marked `reject` must produce no site; one marked `either` may produce a site, but
  then the optimized program must match.

A failure is written as `<out>/<kind>-<seed>-<index>.json` holding the choices (driver.py);
replay it with `--replay` or `attnopt.testing.fuzz.run_case(json.load(...)["choices"])`.

Case files are data: the torch programs are Python source built from the choices, so every
choice is checked against the grammar's allowed values (`check_choices`: known keys only, each
string from its set, each size an int in range) before any source is generated. A case with
anything else (code pasted into a choice, say) is refused: `BadCase`, and `--replay` prints one
line and exits 2 without running anything.

This package is the fuzzer's public face: the names below are what tests and users reach as
`fuzz.<name>`.
"""
from __future__ import annotations

from attnopt.testing.fuzz.driver import Summary, fuzz, main
from attnopt.testing.fuzz.grammar import (FORM_KEYS, MAX_CASE_BYTES, BadCase, check_choices,
                                          expectation, forms, load_case, sample, scale_value)
from attnopt.testing.fuzz.onnx_case import onnx_feeds, onnx_model, ort_run
from attnopt.testing.fuzz.run import Outcome, max_rel, run_case, run_onnx, run_torch
from attnopt.testing.fuzz.torch_case import torch_inputs, torch_module, torch_source

__all__ = ["BadCase", "FORM_KEYS", "MAX_CASE_BYTES", "Outcome", "Summary", "check_choices",
           "expectation", "forms", "fuzz", "load_case", "main", "max_rel", "onnx_feeds",
           "onnx_model", "ort_run", "run_case", "run_onnx", "run_torch", "sample", "scale_value",
           "torch_inputs", "torch_module", "torch_source"]
