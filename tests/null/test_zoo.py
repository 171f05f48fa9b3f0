"""The zoo itself: models run, expected specs match what the models really do, every export
flavour reproduces the torch output, and sharpening makes a wrong scale visible."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zoo import flavours as fl
from zoo import handwritten as hw
from zoo import hf
from zoo.sharpen import sharpen_
from zoo.testing import reference_attention, shared_dir

ONNX_FLAVOURS = ("onnx_ts17", "onnx_dynamo", "onnx_dynamo23")


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    return shared_dir(tmp_path_factory)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- sharpening -----------------------------------------------------------------------------

def _bert_with_scale(factor: float, sharpen: bool) -> torch.Tensor:
    zm = hf.build("bert_eager")
    if not sharpen:  # rebuild with the default init (std 0.02)
        torch.manual_seed(0)
        from transformers import BertModel
        zm.model = BertModel(zm.model.config, add_pooling_layer=False).eval()
    for mod in zm.model.modules():
        if hasattr(mod, "scaling"):
            mod.scaling *= factor
    return zm.run()


def test_sharpen_makes_wrong_scale_visible():
    base, wrong = _bert_with_scale(1.0, True), _bert_with_scale(1.5, True)
    assert _rel(wrong, base) > 0.1, "a 1.5x scale bug must move a sharpened model's output"
    dull = _rel(_bert_with_scale(1.5, False), _bert_with_scale(1.0, False))
    assert dull < 1e-2, f"default init was expected to hide the bug (moved by {dull})"


def test_sharpen_makes_dropped_padding_visible():
    zm = hf.build("bert_eager")
    ref = zm.run()
    kw = dict(zm.kwargs, attention_mask=torch.ones_like(zm.kwargs["attention_mask"]))
    with torch.no_grad():
        nomask = hf.first_tensor(zm.model(**kw))
    assert _rel(nomask[1, :-hf.PAD], ref[1, :-hf.PAD]) > 0.1


def test_sharpen_deterministic_and_fan_in():
    a, b = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32)
    sharpen_(a, seed=3), sharpen_(b, seed=3)
    assert torch.equal(a.weight, b.weight)
    assert abs(float(a.weight.detach().std()) - 2 / 8) < 0.03
    conv = sharpen_(torch.nn.Conv2d(3, 16, 4), seed=0)
    assert abs(float(conv.weight.detach().std()) - 2 / (48 ** 0.5)) < 0.05


# ---- HF models --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", hf.NAMES)
def test_model_runs_and_expected_matches_probe(name):
    zm = hf.build(name)
    y = zm.run()
    assert torch.isfinite(y).all()
    assert hf.probe_sites(zm) == zm.expected


@pytest.mark.parametrize("name", hf.NAMES)
def test_compile_capture_reproduces_output(name):
    zm = hf.build(name)
    graphs = fl.via_compile(zm)
    assert len(graphs) == fl.GRAPH_BREAKS.get(name, (1, ""))[0]
    if len(graphs) == 1:
        gm, ex = graphs[0]
        with torch.no_grad():
            out = gm(*ex)
        got = hf.first_tensor(out)
        torch.testing.assert_close(got, zm.run(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", hf.NAMES)
def test_pt2_reloads_and_matches(name, zoo_dir):
    zm = hf.build(name)
    ep, path = fl.via_pt2(zm, zoo_dir)
    assert path.exists() and path.suffix == ".pt2"
    with torch.no_grad():
        got = hf.first_tensor(ep.module()(**zm.kwargs))
    torch.testing.assert_close(got, zm.run(), rtol=1e-5, atol=1e-5)


def _check_onnx(zm, flavour, zoo_dir):
    key = (zm.name, flavour)
    if key in fl.KNOWN_EXPORT_GAPS:
        pytest.skip(fl.KNOWN_EXPORT_GAPS[key])
    path, _ = fl.export(zm, flavour, zoo_dir)
    if key in fl.KNOWN_ORT_GAPS:
        pytest.skip(fl.KNOWN_ORT_GAPS[key])
    got = np.asarray(fl.run_onnx(path, zm.inputs)[0], dtype=np.float32)
    ref = fl.reference_output(zm).float().numpy()
    tol = 1e-4 * max(1.0, float(np.abs(ref).max())) if ref.dtype == np.float32 and zm.family != "hand" else 1e-4
    if any(a.dtype == torch.float16 for a in zm.args):
        tol = 2e-2
    err = float(np.abs(got - ref).max())
    assert err <= tol, f"{zm.name} {flavour}: max abs error {err} > {tol}"


@pytest.mark.parametrize("flavour", ONNX_FLAVOURS)
@pytest.mark.parametrize("name", hf.NAMES)
def test_onnx_runs_in_ort_and_matches(name, flavour, zoo_dir):
    _check_onnx(hf.build(name), flavour, zoo_dir)


# ---- hand-written cases ---------------------------------------------------------------------

@pytest.mark.parametrize("name", hw.CASE_NAMES)
def test_handwritten_runs(name):
    c = hw.get(name)
    with torch.no_grad():
        y = c.module(*c.args)
    y = y[0] if isinstance(y, tuple) else y
    assert torch.isfinite(y.float()).all()
    assert (c.expected is None) != (c.expected_reject is None)


# Cases whose args are (q, k, v[, attention_mask]) and whose expected spec has no score mods:
# their output must equal attention computed from the expected spec alone.
_REFERENCE_CASES = [c.name for c in hw.cases()
                    if c.expected and not c.expected[0]["score_mods"]
                    and len(c.args) in (3, 4) and c.args[0].dim() == 4
                    and c.name not in ("k_permute_bshd", "k_pretransposed_input")]


@pytest.mark.parametrize("name", _REFERENCE_CASES)
def test_handwritten_expected_spec_is_the_math(name):
    c = hw.get(name)
    with torch.no_grad():
        y = c.module(*c.args).float()
    q, k, v = c.args[:3]
    am = c.args[3] if len(c.args) == 4 else None
    ref = reference_attention(c.expected[0], q, k, v, am)
    tol = 2e-2 if q.dtype == torch.float16 else 1e-5
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("flavour", ("onnx_ts17", "onnx_dynamo23"))
@pytest.mark.parametrize("name", hw.CASE_NAMES)
def test_handwritten_onnx_matches(name, flavour, zoo_dir):
    _check_onnx(hw.get(name).as_zoo(), flavour, zoo_dir)
