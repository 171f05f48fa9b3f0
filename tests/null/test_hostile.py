"""Hostile and awkward inputs for the CLI and the API: one-line errors with distinct exit
codes, no traceback, and never a partial, corrupt or overwritten file. Plus determinism."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from attnopt.testing import fuzz
from zoo.testing import run_cli as run



def one_line(err: str) -> bool:
    return "Traceback" not in err and len(err.strip().splitlines()) == 1


def attention_onnx(path: Path, dtype: str = "float32", dynamic: bool = False) -> Path:
    c = fuzz.sample(__import__("random").Random(1), "onnx")
    c.update(near="dynamic_seq" if dynamic else "none", dtype=dtype, cast="none", mask="none",
             gqa="none", KVH=c["H"], softcap=False, nan_guard=False, layout="bhsd",
             ktrans="transpose", cross=False, Sk=c["S"], v_dim=False, Dv=c["D"])
    onnx.save(fuzz.onnx_model(c), path)
    return path


@pytest.fixture
def model(tmp_path):
    return attention_onnx(tmp_path / "m.onnx")


def test_missing_and_directory(tmp_path):
    rc, _, err = run("inspect", tmp_path / "nope.onnx")
    assert rc == 3 and "no such file" in err and one_line(err)
    rc, _, err = run("optimize", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx")
    assert rc == 3 and one_line(err) and not (tmp_path / "o.onnx").exists()
    rc, _, err = run("inspect", tmp_path)
    assert rc == 4 and "directory" in err and one_line(err)


@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_empty_and_truncated_optimize(model, tmp_path, how):
    data = model.read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"" if how == "empty" else data[: len(data) // 3])
    before = bad.read_bytes()
    out = tmp_path / "out.onnx"
    rc, _, err = run("optimize", bad, "-o", out)
    assert rc == 4 and one_line(err) and not out.exists() and bad.read_bytes() == before


def test_zip_that_is_not_pt2(tmp_path):
    p = tmp_path / "x.pt2"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("hello.txt", "not a program")
    rc, _, err = run("inspect", p)
    assert rc == 4 and "could not be loaded" in err and one_line(err)
    rc, _, err = run("optimize", p, "-o", tmp_path / "y.pt2")
    assert rc == 4 and one_line(err) and not (tmp_path / "y.pt2").exists()


def test_pt2_with_corrupted_version(tmp_path):
    import torch

    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),)), good)
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if "version" in item.filename.lower():
                data = b"999999\x00garbage"
            zout.writestr(item, data)
    rc, _, err = run("inspect", bad)
    assert rc == 4 and one_line(err)


def test_onnx_with_missing_external_data(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    p = tmp_path / "ext.onnx"
    onnx.save(m, p, save_as_external_data=True, location="ext.data", size_threshold=0)
    (tmp_path / "ext.data").unlink()
    rc, _, err = run("inspect", p)
    assert rc == 4 and "external data" in err and one_line(err)


def test_output_under_a_regular_file_and_same_as_input(model, tmp_path):
    before = model.read_bytes()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = run("optimize", model, "-o", blocker / "out.onnx")
    assert rc == 6 and one_line(err)
    rc, _, err = run("optimize", model, "-o", model)
    assert rc == 6 and "is the input" in err and model.read_bytes() == before


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_fp16_and_dynamic_models(tmp_path, dtype):
    src = attention_onnx(tmp_path / "d.onnx", dtype=dtype, dynamic=True)
    rc, out, err = run("inspect", src, "--json")
    assert rc == 0, err
    rc, out, err = run("optimize", src, "-o", tmp_path / "o.onnx", "--json")
    assert rc == 0, err and (tmp_path / "o.onnx").exists()


def test_huge_graph_inspect_is_fast(tmp_path):
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"n{i}") for i in range(100_000)]
    g = helper.make_graph(nodes, "huge", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("t100000", TensorProto.FLOAT, [2, 4])])
    p = tmp_path / "huge.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), p)
    t = time.time()
    rc, out, err = run("inspect", p, "--json")
    assert rc == 0, err
    assert time.time() - t < 120


@pytest.mark.parametrize("delay", [1.0, 5.0])  # during the torch import; during the optimization
def test_sigint_during_optimize(model, tmp_path, delay):
    out = tmp_path / "o.onnx"
    before = model.read_bytes()
    # The console entry point (attnopt_cli) handles a ^C during the torch import too.
    # The child must start with ^C's default disposition whatever the test runner set for itself
    # (an ignored SIGINT is inherited and would make this test vacuous).
    p = subprocess.Popen([sys.executable, "-m", "attnopt_cli", "optimize", str(model), "-o", str(out)],
                         stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("optimize finished before the signal")
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, (delay, p.returncode, err[-800:])
    assert not out.exists() and not list(tmp_path.glob("*.tmp-*")) and model.read_bytes() == before


def test_onnx_optimize_is_deterministic(model, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert run("optimize", model, "-o", a)[0] == 0
    assert run("optimize", model, "-o", b)[0] == 0
    assert a.read_bytes() == b.read_bytes()


def test_pt2_optimize_is_deterministic(tmp_path):
    import torch

    c = fuzz.sample(__import__("random").Random(2), "torch")
    c.update(near="none", capture="export", layout="bhsd", product="matmul", mask="none",
             gqa="none", KVH=c["H"], ktrans="transpose", dtype="float32", cast="none")
    m = fuzz.torch_module(c)
    src = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(m, tuple(fuzz.torch_inputs(c, 0))), src)
    a, b = tmp_path / "a.pt2", tmp_path / "b.pt2"
    assert run("optimize", src, "-o", a)[0] == 0
    assert run("optimize", src, "-o", b)[0] == 0
    ga, gb = (str(torch.export.load(p).graph) for p in (a, b))
    assert ga == gb


def test_read_only_output_directory(model, tmp_path, monkeypatch):
    """Tests run as root, which ignores directory permissions, so the check is made to see a
    read-only directory the way it would for a normal user."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro and mode == os.W_OK
                        else real_access(p, mode))
    before = model.read_bytes()
    rc, _, err = run("optimize", model, "-o", ro / "o.onnx")
    assert rc == 6 and "not writable" in err and one_line(err)
    assert not list(ro.iterdir()) and model.read_bytes() == before


def test_several_outputs_and_returned_attention_weights(tmp_path):
    """The example model returns (logits, weights of its last layer): that layer is a near
    miss left alone, the other two are rewritten, and both outputs survive."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    from tiny_transformer import build, example_inputs

    m, x = build(), example_inputs()
    src = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(m, x), src)
    out = tmp_path / "o.pt2"
    rc, stdout, err = run("optimize", src, "-o", out, "--json")
    assert rc == 0, err
    ep = torch.export.load(out)
    logits, weights = ep.module()(*x)
    ref_logits, ref_weights = m(*x)
    # the last layer sees the rewritten layers' outputs, equal up to float noise
    assert torch.allclose(logits, ref_logits, atol=1e-4) and torch.allclose(weights, ref_weights, atol=1e-5)
    assert '"sites_rewritten": 2' in stdout


def test_bf16_model(tmp_path):
    import torch

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 16, generator=g).bfloat16() for _ in range(3))
    src = tmp_path / "bf16.pt2"
    torch.export.save(torch.export.export(Attn(), (q, k, v)), src)
    rc, out, err = run("inspect", src, "--json")
    assert rc == 0 and '"dtype": "bfloat16"' in out
    rc, out, err = run("optimize", src, "-o", tmp_path / "o.pt2", "--json")
    assert rc == 0 and '"sites_rewritten": 1' in out, err


def test_unreadable_input(model, monkeypatch):
    """As for the read-only directory: root reads anything, so the check is shown a file the
    user may not read."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == model and mode == os.R_OK
                        else real_access(p, mode))
    rc, _, err = run("inspect", model)
    assert rc == 4 and "not readable" in err and one_line(err)
    rc, _, err = run("optimize", model, "-o", model.with_name("o.onnx"))
    assert rc == 4 and "not readable" in err and one_line(err)
    assert not model.with_name("o.onnx").exists()


def test_failure_caused_by_a_ctrl_c_reports_interrupted():
    # a ^C inside a native extension's module init surfaces as an ImportError ("initialization
    # failed"): the command must still say "interrupted" and exit 130, not report an internal error
    import typer

    from attnopt.cli import common as cli

    def failing_import():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("initialization failed")

    cli._INTERRUPT_REPORTED = False
    with pytest.raises(typer.Exit) as info:
        with cli.user_errors(debug=False):
            failing_import()
    assert info.value.exit_code == 130
    with pytest.raises(typer.Exit) as info:  # an unrelated bug stays an internal error
        with cli.user_errors(debug=False):
            raise ImportError("no module named nothing")
    assert info.value.exit_code == 1
    cli._INTERRUPT_REPORTED = False
