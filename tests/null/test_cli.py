"""The attnopt CLI: tables, JSON, explanations, and one-line errors with distinct exit codes
for every kind of bad input; outputs are complete or absent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from zoo.testing import run_cli as run

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "attnopt.cli"]


def run_process(*args):
    p = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "200"})
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    out = tmp_path_factory.mktemp("example")
    subprocess.run([sys.executable, str(ROOT / "examples" / "tiny_transformer.py"), str(out)],
                   check=True, capture_output=True)
    return out


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_inspect_json_and_table(example, fmt):
    model = example / f"tiny_transformer.{fmt}"
    rc, out, err = run("inspect", model, "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert [s["name"] for s in data["sites"]] == ["layers.0", "layers.1"]
    for s in data["sites"]:
        assert (s["normalizer"], s["num_heads"], s["num_kv_heads"], s["q_len"], s["kv_len"],
                s["head_dim"]) == ("softmax", 4, 2, 32, 32, 16)
        assert s["scale"] == pytest.approx(0.25)
        assert s["mask"] == {"kind": "causal", "left": None, "right": 0, "padding": True}
        assert s["token_grid"] is None
    assert len(data["rejected"]) == 1 and "used elsewhere" in data["rejected"][0]["reason"]
    rc, out, _ = run("inspect", model, "--explain")
    assert rc == 0 and "layers.0" in out and "causal+padding" in out and "used elsewhere" in out


def test_errors_are_one_line_with_exit_codes(tmp_path):
    missing = tmp_path / "nope.onnx"
    rc, out, err = run("inspect", missing)
    assert rc == 3 and err.strip().startswith("error: no such file") and len(err.strip().splitlines()) == 1
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(4096))
    rc, _, err = run("inspect", junk)
    assert rc == 4 and "neither an ONNX model nor a .pt2" in err and "Traceback" not in err
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    rc, _, err = run("inspect", empty)
    assert rc == 4 and "empty" in err


def test_truncated_onnx(example, tmp_path):
    data = (example / "tiny_transformer.onnx").read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    rc, _, err = run("inspect", bad)
    assert rc == 4 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_no_attention_is_an_empty_report(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    path = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 8),)), path)
    rc, out, err = run("inspect", path)
    assert rc == 0 and "no attention found" in out
    rc, out, _ = run("inspect", path, "--json")
    assert rc == 0 and json.loads(out) == {"sites": [], "rejected": []}


def test_optimize_pt2_json(example, tmp_path):
    out_path = tmp_path / "opt.pt2"
    rc, out, err = run("optimize", example / "tiny_transformer.pt2", "-o", out_path, "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert data["sites_found"] == 2 and data["sites_rewritten"] == 2
    assert data["max_abs_error"] < 1e-4 and data["output"] == str(out_path)
    assert out_path.exists() and not list(tmp_path.glob("*.tmp-*"))
    rc, out, _ = run("inspect", out_path, "--json")
    assert [s["pattern"] for s in json.loads(out)["sites"]] == ["fused:attnopt"] * 2


def test_optimize_output_errors(example, tmp_path):
    src = example / "tiny_transformer.pt2"
    before = src.read_bytes()
    rc, _, err = run("optimize", src, "-o", tmp_path / "missing" / "x.pt2")
    assert rc == 6 and "does not exist" in err
    rc, _, err = run("optimize", src, "-o", src)
    assert rc == 6 and "is the input" in err
    rc, _, err = run("optimize", src, "-o", tmp_path / "x.onnx")
    assert rc == 6 and "format" in err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root ignores permissions
            rc, _, err = run("optimize", src, "-o", ro / "x.pt2")
            assert rc == 6 and "not writable" in err
    finally:
        ro.chmod(0o700)
    assert src.read_bytes() == before
    assert not list(tmp_path.rglob("*.pt2"))


def test_debug_shows_traceback(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    rc, _, err = run_process("inspect", junk, "--debug")
    assert rc != 0 and "Traceback" in err
    rc, _, err = run_process("inspect", junk)
    assert rc == 4 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_model_onnxruntime_cannot_run(example, tmp_path):
    """Validation needs the user's own model to run in ONNX Runtime; when it cannot (an op ORT
    does not implement), optimize says so in one line, exits non-zero and writes nothing."""
    import onnx
    from onnx import helper

    m = onnx.load(str(example / "tiny_transformer.onnx"))
    x = m.graph.input[0].name
    m.graph.node.append(helper.make_node("Mystery", [x], ["mystery_out"], domain="com.example"))
    m.graph.output.append(helper.make_tensor_value_info("mystery_out", onnx.TensorProto.FLOAT, None))
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    src, out = tmp_path / "mystery.onnx", tmp_path / "out.onnx"
    onnx.save(m, str(src))
    rc, _, err = run("optimize", src, "-o", out)
    assert rc != 0 and "ONNX Runtime cannot run the input model" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
