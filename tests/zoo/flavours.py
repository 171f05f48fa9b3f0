"""Every form a zoo model reaches attnopt in: a dynamo graph, a reloaded .pt2, ONNX files.

Exports are cached on disk in a directory the caller owns (tests pass a session tmp dir shared
by xdist workers); a file lock per artefact makes concurrent workers export it once, and every
file is written to a temporary name and renamed, so a reader never sees half a file.

Flavour names (FLAVOURS): compile, pt2, onnx_ts17, onnx_dynamo (default opset), onnx_dynamo23.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from zoo.hf import ZooModel, first_tensor

FLAVOURS = ("compile", "pt2", "onnx_ts17", "onnx_dynamo", "onnx_dynamo23")
STATIC_FLAVOURS = frozenset(FLAVOURS)  # all exports use static shapes (dynamic=False, no dynamic_shapes)

# Hand-written cases get fewer ONNX flavours to keep the session short (each dynamo export
# costs ~1.5 s): opset 23 always, the default opset only where it differs (SDPA/MHA, which
# opset 23 turns into the standard Attention op).
HAND_FLAVOURS = ("module", "compile", "pt2", "onnx_ts17", "onnx_dynamo23")


def hand_flavours(case_name: str) -> tuple[str, ...]:
    extra = ("onnx_dynamo",) if case_name.startswith(("sdpa", "nn_multihead")) else ()
    return HAND_FLAVOURS + extra


# (model name, flavour) -> why that export cannot be produced. Tests skip with the reason.
# (transformers 5.23's Llama/Mistral export fine with TorchScript: no aten::diff any more.)
KNOWN_EXPORT_GAPS: dict[tuple[str, str], str] = {
    ("sdpa_enable_gqa", "onnx_ts17"):
        "TorchScript exporter: 'conversion of scaled_dot_product_attention not implemented if enable_gqa is True'",
    ("nn_multihead_attention", "onnx_ts17"):
        "TorchScript exporter cannot export aten::_native_multi_head_attention (MHA fast path in no-grad eval)",
}

# The file exports but onnxruntime cannot run it (only the ORT comparison is skipped).
KNOWN_ORT_GAPS: dict[tuple[str, str], str] = {
    ("sdpa_bool_padding_mask", "onnx_dynamo23"):
        "ORT 1.32 CPU Attention(23) rejects a [B,1,1,S] attn_mask: its q dim must equal q_len",
}

# Models whose dynamo capture splits into several graphs: name -> (graph count, why).
# None of the zoo models graph-break (transformers 5.x is compile-clean for these).
GRAPH_BREAKS: dict[str, tuple[int, str]] = {}


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def gap(name: str, flavour: str) -> str | None:
    return KNOWN_EXPORT_GAPS.get((name, flavour))


# ---- torch.compile (dynamo) ----------------------------------------------------------------

def via_compile(zm: ZooModel) -> list[tuple[torch.fx.GraphModule, list[Any]]]:
    """The (GraphModule, example_inputs) pairs dynamo hands a backend, in call order.

    One pair unless dynamo graph-breaks; see GRAPH_BREAKS."""
    import torch._dynamo

    captured: list[tuple[torch.fx.GraphModule, list[Any]]] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list[Any]):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(zm.model, backend=capture, fullgraph=False, dynamic=False)
    with torch.no_grad():
        compiled(*zm.args, **zm.kwargs)
    torch._dynamo.reset()
    return captured


# ---- torch.export .pt2 ----------------------------------------------------------------------

def pt2_path(zm: ZooModel, dir: str | os.PathLike) -> Path:
    return Path(dir) / f"{zm.name}.pt2"


def via_pt2(zm: ZooModel, dir: str | os.PathLike) -> tuple[torch.export.ExportedProgram, Path]:
    """torch.export (non-strict, static), saved to .pt2 and loaded back."""
    path = pt2_path(zm, dir)
    with _locked(path):
        if not path.exists():
            with torch.no_grad():
                ep = torch.export.export(zm.model, args=zm.args, kwargs=zm.kwargs, strict=False)
            tmp = _tmp(path)
            torch.export.save(ep, tmp)
            os.replace(tmp, path)
    from attnopt.frontends.pt2 import load_program

    return load_program(Path(path)), path


# ---- ONNX ---------------------------------------------------------------------------------

class _Positional(torch.nn.Module):
    """Calls the model with its example kwargs passed by name. The TorchScript exporter binds
    kwargs positionally (BertModel.forward gets two values for `use_cache`), so it gets args."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args):
        return self.model(**dict(zip(self.names, args)))


@contextlib.contextmanager
def _restore_mode(model: torch.nn.Module):
    """The TorchScript exporter leaves transformers models in training mode (dropout on)."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for m, t in modes.items():
            m.train(t)


_TORCHLIB_CACHED = False


def _cache_torchlib_ops() -> None:
    """The dynamo exporter rebuilds its torchlib registry (~2.5 s of parsing onnxscript
    sources) on every export; the list is the same each time, so build it once per process."""
    global _TORCHLIB_CACHED
    if _TORCHLIB_CACHED:
        return
    import functools

    from torch.onnx._internal.exporter import _registration

    apis = _registration.onnxscript_apis
    apis.get_torchlib_ops = functools.lru_cache(maxsize=1)(apis.get_torchlib_ops)
    _TORCHLIB_CACHED = True


def _onnx_export(zm: ZooModel, path: Path, **kw: Any) -> Path:
    if kw.get("dynamo"):
        _cache_torchlib_ops()
    with _locked(path):
        if path.exists():
            return path
        tmp = _tmp(path)
        with torch.no_grad(), warnings.catch_warnings(), _restore_mode(zm.model):
            warnings.simplefilter("ignore")
            if kw.get("dynamo") or not zm.kwargs:
                torch.onnx.export(zm.model, args=zm.args, f=str(tmp), kwargs=dict(zm.kwargs),
                                  input_names=list(zm.inputs), **kw)
            else:
                torch.onnx.export(_Positional(zm.model, list(zm.kwargs)), args=tuple(zm.kwargs.values()),
                                  f=str(tmp), input_names=list(zm.kwargs), **kw)
        os.replace(tmp, path)
    return path


def via_onnx_torchscript(zm: ZooModel, dir: str | os.PathLike, opset: int = 17) -> Path:
    return _onnx_export(zm, Path(dir) / f"{zm.name}__onnx_ts{opset}.onnx", dynamo=False,
                        opset_version=opset, do_constant_folding=True)


def via_onnx_dynamo(zm: ZooModel, dir: str | os.PathLike, opset: int | None = None) -> Path:
    tag = "default" if opset is None else str(opset)
    kw: dict[str, Any] = {"dynamo": True, "external_data": False, "verbose": False}
    if opset is not None:
        kw["opset_version"] = opset
    return _onnx_export(zm, Path(dir) / f"{zm.name}__onnx_dynamo{tag}.onnx", **kw)


def export(zm: ZooModel, flavour: str, dir: str | os.PathLike) -> Any:
    """One flavour of a model, as the object attnopt.inspect takes, plus its example inputs.

    Returns (model_object, example_inputs): "module" gives the nn.Module and its example
    inputs (args tuple or kwargs dict); "compile" gives a list of (gm, inputs) pairs and None."""
    if flavour == "module":
        return zm.model, (zm.args if zm.args else zm.kwargs)
    if flavour == "compile":
        return via_compile(zm), None
    if flavour == "pt2":
        return via_pt2(zm, dir)[0], None
    if flavour == "onnx_ts17":
        return via_onnx_torchscript(zm, dir, 17), None
    if flavour == "onnx_dynamo":
        return via_onnx_dynamo(zm, dir, None), None
    if flavour == "onnx_dynamo23":
        return via_onnx_dynamo(zm, dir, 23), None
    raise ValueError(flavour)


def run_onnx(path: str | os.PathLike, kwargs: dict[str, torch.Tensor]) -> list[Any]:
    """Run an exported file in onnxruntime (CPU) on example inputs by name (zm.inputs)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    vals = list(kwargs.values())
    feeds = {n: (kwargs[n] if n in kwargs else vals[k]).numpy() for k, n in enumerate(names)}
    return sess.run(None, feeds)


def reference_output(zm: ZooModel) -> torch.Tensor:
    with torch.no_grad():
        return first_tensor(zm.model(*zm.args, **zm.kwargs))
