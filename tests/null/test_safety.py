"""Files a hostile user hands attnopt (issue: safe by construction), built at run time.

- `.pt2` archives that would run code when loaded (pickled weights/constants, custom and opaque
  objects, legacy pickled payloads, unsafe sample inputs, native code, the legacy layout), under
  `.pt2` and `.onnx` names, through the CLI (inspect, optimize, plan) and the API: exit 4 / one
  UnreadableModel line, and the marker file their payload writes never appears. The second
  line of defence (the guarded load) is tested on its own with the manifest check switched off.
- Outputs that are something the run reads (the model, its external data, a hard or symbolic
  link to it, the plan): exit 6, the input's bytes unchanged.
- Write failures (a full disk, a name too long) are exit 6 and leave nothing behind; a
  non-UTF-8 output name is written.
- Impossible ONNX shapes and initializers, over-long input paths: 4 or 5, never "internal error".
"""
from __future__ import annotations

import copy
import io
import json
import os
import pickle
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

import attnopt
from attnopt.testing import fuzz
from attnopt.errors import UnreadableModel
from zoo.testing import run_cli as run

ROOT = Path(__file__).resolve().parents[2]


def one_line(err: str) -> bool:
    return "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---- hostile .pt2 archives ---------------------------------------------------------------------

class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.register_buffer("bias", torch.ones(8))

    def forward(self, x):
        q = k = v = self.proj(x).view(1, 2, 4, 4).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v) + 0 * self.bias[:4]


@pytest.fixture(scope="module")
def clean_pt2() -> bytes:
    ep = torch.export.export(_Tiny().eval(), (torch.randn(1, 4, 8),))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getvalue()


class _Payload:
    """Unpickling this writes the marker file: the code a crafted archive would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _rewrite(clean: bytes, out: Path, edit) -> Path:
    """Copy the archive entry by entry, letting `edit(rel_name, bytes)` change, drop (None) or
    add entries (it is called once with rel_name None to return extra (rel, bytes) pairs)."""
    zin = zipfile.ZipFile(io.BytesIO(clean))
    root = zin.namelist()[0].split("/", 1)[0]
    with zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            data = edit(rel, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
        for rel, data in edit(None, b"") or ():
            zout.writestr(f"{root}/{rel}", data)
    return out


def _pickled_weight(marker):
    def edit(rel, data):
        if rel == "data/weights/model_weights_config.json":
            cfg = json.loads(data)
            first = next(iter(cfg["config"]))
            cfg["config"][first]["use_pickle"] = True
            return json.dumps(cfg).encode()
        if rel == "data/weights/weight_0":
            return pickle.dumps(_Payload(marker))
        return None if rel is None else data
    return edit


def _pickled_constant(marker):
    def edit(rel, data):
        if rel == "data/constants/model_constants_config.json":
            cfg = json.loads(data)
            cfg["config"]["evil"] = {"path_name": "tensor_99", "is_param": False, "use_pickle": True,
                                     "tensor_meta": None}
            return json.dumps(cfg).encode()
        if rel is None:
            return [("data/constants/tensor_99", pickle.dumps(_Payload(marker)))]
        return data
    return edit


def _object_constant(prefix):
    def make(marker):
        def edit(rel, data):
            if rel == "data/constants/model_constants_config.json":
                cfg = json.loads(data)
                cfg["config"]["evil"] = {"path_name": f"{prefix}0", "is_param": False,
                                         "use_pickle": False, "tensor_meta": None}
                return json.dumps(cfg).encode()
            if rel is None:
                return [(f"data/constants/{prefix}0", pickle.dumps(_Payload(marker)))]
            return data
        return edit
    return make


def _sample_inputs(marker):
    def edit(rel, data):
        if rel == "data/sample_inputs/model.pt":
            return pickle.dumps(_Payload(marker))  # torch retries such a file with weights_only=False
        return None if rel is None else data
    return edit


def _legacy_weights(marker):
    def edit(rel, data):
        if rel is None:
            buf = io.BytesIO()
            torch.save({"w": _Payload(marker)}, buf)
            return [("data/weights/model.pt", buf.getvalue())]
        return data
    return edit


def _native_code(marker):
    def edit(rel, data):
        if rel is None:
            return [("data/aotinductor/model/model.so", b"\x7fELF not really")]
        return data
    return edit


def _legacy_layout(marker):
    def edit(rel, data):
        return None if rel in ("archive_format", None) else data
    return edit


HOSTILE = {
    "pickled_weight": _pickled_weight,
    "pickled_constant": _pickled_constant,
    "custom_object": _object_constant("custom_obj_"),
    "opaque_object": _object_constant("opaque_obj_"),
    "sample_inputs": _sample_inputs,
    "legacy_weights": _legacy_weights,
    "native_code": _native_code,
    "legacy_layout": _legacy_layout,
}


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_pt2_never_runs_code(clean_pt2, tmp_path, kind, suffix):
    marker = tmp_path / "MARKER"
    evil = _rewrite(clean_pt2, tmp_path / f"evil{suffix}", HOSTILE[kind](marker))
    before = evil.read_bytes()
    rc, _, err = run("inspect", evil)
    assert rc == 4 and one_line(err), (rc, err)
    if kind not in ("legacy_layout",):
        assert "refuses" in err and "--allow-unsafe-pickle" in err, err
    out = tmp_path / f"out{suffix}"
    rc, _, err = run("optimize", evil, "-o", out)
    assert rc == 4 and one_line(err) and not out.exists(), (rc, err)
    if suffix == ".pt2":
        rc, _, err = run("plan", evil, "-o", tmp_path / "plan.json")
        assert rc == 4 and one_line(err) and not (tmp_path / "plan.json").exists(), (rc, err)
    for api in (attnopt.inspect, attnopt.optimize):
        with pytest.raises(UnreadableModel):
            api(evil)
    assert not marker.exists()
    assert evil.read_bytes() == before


@pytest.mark.parametrize("kind", ["pickled_weight", "pickled_constant", "opaque_object",
                                  "custom_object", "sample_inputs", "legacy_weights"])
def test_guarded_load_alone_runs_no_code(clean_pt2, tmp_path, monkeypatch, kind):
    """Defence in depth: with the manifest check switched off, the guarded torch.export.load
    still refuses to unpickle (weights_only forced, raw unpicklers replaced)."""
    from attnopt.frontends import pt2

    marker = tmp_path / "MARKER"
    evil = _rewrite(clean_pt2, tmp_path / "evil.pt2", HOSTILE[kind](marker))
    monkeypatch.setattr(pt2, "check_archive", lambda *a: None)
    with pytest.raises(UnreadableModel):
        pt2.load_program(evil)
    assert not marker.exists()
    # and the process-wide switches are put back
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None
    import pickle as real_pickle

    from torch.export.pt2_archive import _package
    assert _package.pickle is real_pickle


def test_duplicate_entries_refused(clean_pt2, tmp_path):
    zin = zipfile.ZipFile(io.BytesIO(clean_pt2))
    p = tmp_path / "dup.pt2"
    with zipfile.ZipFile(p, "w") as z:
        for info in zin.infolist():
            z.writestr(info.filename, zin.read(info.filename))
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            z.writestr(zin.namelist()[0], b"second copy")
    rc, _, err = run("inspect", p)
    assert rc == 4 and "duplicate" in err and one_line(err)


def test_clean_pt2_still_loads_and_trust_is_opt_in(clean_pt2, tmp_path):
    p = tmp_path / "clean.pt2"
    p.write_bytes(clean_pt2)
    assert len(attnopt.inspect(p).sites) == 1
    rc, out, err = run("inspect", p, "--allow-unsafe-pickle")
    assert rc == 0 and "warning" in err and "runs any code" in err
    # trusting is scoped: after the block, a pickled archive is refused again
    evil = _rewrite(clean_pt2, tmp_path / "evil.pt2", _pickled_weight(tmp_path / "MARKER"))
    with attnopt.trust_pickled_files():
        pass
    with pytest.raises(UnreadableModel):
        attnopt.inspect(evil)


# ---- outputs that are inputs -------------------------------------------------------------------

def attention_onnx(path: Path) -> Path:
    c = fuzz.sample(random.Random(1), "onnx")
    c.update(near="none", dtype="float32", cast="none", mask="none", gqa="none", KVH=c["H"],
             softcap=False, nan_guard=False, layout="bhsd", ktrans="transpose", cross=False,
             Sk=c["S"], v_dim=False, Dv=c["D"])
    onnx.save(fuzz.onnx_model(c), path)
    return path


@pytest.fixture(scope="module")
def tiny_example(tmp_path_factory) -> Path:
    """The demo's tiny transformer exported once per module (a subprocess of ~10 s): the folder
    holding tiny_transformer.onnx and .pt2. Tests copy what they use; never written to."""
    out = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, str(ROOT / "examples" / "tiny_transformer.py"), str(out)],
                   check=True, capture_output=True)
    return out


@pytest.fixture
def external_model(tiny_example, tmp_path):
    """An ONNX model whose weights live in `weights.onnx` (a name that passes the suffix check)."""
    m = onnx.load(str(tiny_example / "tiny_transformer.onnx"))
    onnx.save_model(m, str(tmp_path / "ext.onnx"), save_as_external_data=True,
                    location="weights.onnx", size_threshold=0)
    return tmp_path / "ext.onnx", tmp_path / "weights.onnx"


def test_output_is_the_external_data(external_model, tmp_path):
    model, weights = external_model
    before = weights.read_bytes(), model.read_bytes()
    rc, _, err = run("optimize", model, "-o", weights)
    assert rc == 6 and "external data" in err and one_line(err)
    assert (weights.read_bytes(), model.read_bytes()) == before
    # the output's own side file (NAME.data) may not be the input's weights either
    side = tmp_path / "side.onnx"
    m = onnx.load(str(model), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "side.onnx.data"
    (tmp_path / "side.onnx.data").write_bytes(weights.read_bytes())
    onnx.save(m, str(tmp_path / "m2.onnx"))
    rc, _, err = run("optimize", tmp_path / "m2.onnx", "-o", side)
    assert rc == 6 and one_line(err) and (tmp_path / "side.onnx.data").read_bytes() == before[0]


@pytest.mark.parametrize("how", ["hardlink", "symlink"])
def test_output_is_a_link_to_the_input(tmp_path, how):
    model = attention_onnx(tmp_path / "m.onnx")
    before = model.read_bytes()
    link = tmp_path / "link.onnx"
    (os.link if how == "hardlink" else os.symlink)(model, link)
    rc, _, err = run("optimize", model, "-o", link)
    assert rc == 6 and "input model" in err and one_line(err)
    assert model.read_bytes() == before


def test_output_is_the_plan(clean_pt2, tmp_path):
    model = tmp_path / "m.pt2"
    model.write_bytes(clean_pt2)
    plan = tmp_path / "plan.pt2"  # a plan file with a model's suffix: still an input
    attnopt.plan(model).save(plan)
    before = plan.read_bytes()
    rc, _, err = run("optimize", model, "--plan", plan, "-o", plan)
    assert rc == 6 and "plan" in err and one_line(err) and plan.read_bytes() == before


# ---- write failures ----------------------------------------------------------------------------

def _small_fs(tmp_path) -> Path | None:
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(d)],
                       capture_output=True)
    return d if r.returncode == 0 else None


@pytest.mark.parametrize("how", ["tmpfs", "injected"])
@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_full_disk_is_exit_6_and_leaves_nothing(clean_pt2, tmp_path, monkeypatch, suffix, how):
    model = tmp_path / f"m{suffix}"
    if suffix == ".pt2":
        model.write_bytes(clean_pt2)
    else:
        attention_onnx(model)
    small = _small_fs(tmp_path) if how == "tmpfs" else None
    if how == "tmpfs" and small is None:
        pytest.skip("mounting a small tmpfs is not allowed here (the injected case still runs)")
    try:
        if small is None:  # no mount allowed here: inject the error the writers would see
            import errno

            from attnopt.pipeline import outputs

            def full(*a, **k):
                raise OSError(errno.ENOSPC, "No space left on device")
            monkeypatch.setattr(outputs, "open", full, raising=False)  # the .pt2 bytes
            monkeypatch.setattr(onnx, "save_model", full)
            target = tmp_path / "out"
            target.mkdir()
        else:
            # fill the file system to the last block: not even a tiny model fits
            fd = os.open(small / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(fd, b"\0" * 512):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)
            target = small
        out = target / f"o{suffix}"
        rc, _, err = run("optimize", model, "-o", out)
        assert rc == 6 and "No space left" in err and one_line(err), (rc, err)
        assert sorted(p.name for p in target.iterdir()) in ([], ["filler"])
    finally:
        if small is not None:
            subprocess.run(["umount", str(small)], capture_output=True)


def test_odd_output_names(clean_pt2, tmp_path):
    model = tmp_path / "m.pt2"
    model.write_bytes(clean_pt2)
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/odd\xff.pt2"))
    rc, _, err = run("optimize", model, "-o", odd)
    assert rc == 0, err
    assert any(os.fsencode(p.name) == b"odd\xff.pt2" for p in tmp_path.iterdir())
    long = tmp_path / ("x" * 300 + ".pt2")
    rc, _, err = run("optimize", model, "-o", long)
    assert rc == 6 and "too long" in err and one_line(err)
    assert not any(p.name.startswith(".attnopt-tmp-") for p in tmp_path.iterdir())


# ---- impossible shapes and paths ---------------------------------------------------------------

def _with_seq(model: onnx.ModelProto, value: int) -> onnx.ModelProto:
    m = copy.deepcopy(model)
    for i in m.graph.input:
        i.type.tensor_type.shape.dim[2].dim_value = value
    return m


@pytest.mark.parametrize("value,code", [(0, 5), (-5, 4), (10**12, 5)])
def test_impossible_sequence_lengths(tmp_path, value, code):
    base = onnx.load(str(attention_onnx(tmp_path / "base.onnx")))
    p = tmp_path / "m.onnx"
    onnx.save(_with_seq(base, value), str(p))
    for args in (("inspect", p), ("optimize", p, "-o", tmp_path / "o.onnx")):
        rc, _, err = run(*args)
        assert rc == code and one_line(err) and "internal error" not in err, (args, rc, err)
    assert not (tmp_path / "o.onnx").exists()


def test_initializer_declaring_more_than_it_stores(tmp_path):
    m = onnx.load(str(attention_onnx(tmp_path / "base.onnx")))
    t = TensorProto()
    t.name, t.data_type = "big", TensorProto.FLOAT
    t.dims.extend([10**12])
    m.graph.initializer.append(t)
    m.graph.node.append(helper.make_node("Identity", ["big"], ["big_out"]))
    m.graph.output.append(helper.make_tensor_value_info("big_out", TensorProto.FLOAT, [10**12]))
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    rc, _, err = run("optimize", p, "-o", tmp_path / "o.onnx")
    assert rc == 4 and "declares" in err and one_line(err)


def test_over_long_input_path(tmp_path):
    rc, _, err = run("inspect", tmp_path / ("y" * 5000 + ".onnx"))
    assert rc in (3, 4) and one_line(err) and "internal error" not in err


def test_out_of_memory_is_not_an_internal_error(tmp_path, monkeypatch):
    p = attention_onnx(tmp_path / "m.onnx")

    def boom(*a, **k):
        raise MemoryError()
    monkeypatch.setattr("attnopt.optimize", boom)
    rc, _, err = run("optimize", p, "-o", tmp_path / "o.onnx")
    assert rc == 5 and "memory" in err and one_line(err)


# ---- code that a .pt2 hides outside pickles ----------------------------------------------------

def _dynamic_pt2() -> tuple[bytes, dict]:
    class M(torch.nn.Module):
        def forward(self, x, y):
            torch._check(x.shape[0] % 2 == 0)
            return (x.reshape(x.shape[0] // 2, -1, 4) * 2).sum() + y[: x.shape[0]].sum()

    auto = torch.export.Dim.AUTO
    ep = torch.export.export(M(), (torch.randn(4, 4), torch.randn(70)),
                             dynamic_shapes=({0: auto}, {0: auto}))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    root = z.namelist()[0].split("/", 1)[0]
    return buf.getvalue(), json.loads(z.read(f"{root}/models/model.json"))


def _with_program(clean: bytes, program: dict, out: Path) -> Path:
    return _rewrite(clean, out, lambda rel, data: json.dumps(program).encode()
                    if rel == "models/model.json" else (None if rel is None else data))


def test_size_expression_and_guard_code_never_run(tmp_path):
    """sympy.sympify evaluates a size expression's text while torch loads the archive, and the
    program's guards become a function when ep.module() is built: both are checked, not run."""
    clean, program = _dynamic_pt2()
    marker = tmp_path / "MARKER"
    payload = f"__import__('os').system('touch {marker}')"
    sized = copy.deepcopy(program)
    tv = sized["graph_module"]["graph"]["tensor_values"]
    first = next(v for v in tv.values() if "as_expr" in v["sizes"][0])
    first["sizes"][0]["as_expr"]["expr_str"] = payload + " and " + first["sizes"][0]["as_expr"]["expr_str"]
    guarded = copy.deepcopy(program)
    guarded["guards_code"] = [payload] + guarded["guards_code"]
    for name, prog in (("size", sized), ("guard", guarded)):
        p = _with_program(clean, prog, tmp_path / f"{name}.pt2")
        rc, _, err = run("inspect", p)
        assert rc == 4 and "torch never writes" in err and one_line(err), (name, rc, err)
        rc, _, err = run("optimize", p, "-o", tmp_path / "o.pt2")
        assert rc == 4 and one_line(err)
    assert not marker.exists()
    # the genuine program, guards and all, still loads and runs at another size
    p = tmp_path / "dyn.pt2"
    p.write_bytes(clean)
    from attnopt.frontends.pt2 import load_program
    ep = load_program(p)
    assert ep.module()(torch.randn(6, 4), torch.randn(70)).shape == ()


@pytest.mark.parametrize("text", [
    "__import__('os').system('id')", "exec('1')", "s0.__class__", "Symbol('x').func",
    "lambda: 0", "Symbol('s0', positive=__import__('os'))", "open('f')", "[s0 for s0 in s1]",
    "getattr(s0, 'x')", "Symbol('__class__')", "Max(s0, eval('1'))"])
def test_size_expressions_outside_the_grammar(text):
    from attnopt.frontends.pt2_checks import UnsafeProgram, check_sym_expr
    with pytest.raises(UnsafeProgram):
        check_sym_expr(text)


@pytest.mark.parametrize("text", [
    "Symbol('s77', positive=True, integer=True)", "2*s0 + 1", "FloorDiv(s0, 2)", "Max(1, s17)",
    "Mod(s0, 8)", "Eq(s0, 4)", "ModularIndexing(s0, 1, 4)", "PythonMod(s3, 2) < s4",
    "GreaterThan(Symbol('u0', integer=True), Integer(0))", "StrictLessThan(u1, s0)"])
def test_size_expressions_torch_writes(text):
    from attnopt.frontends.pt2_checks import check_sym_expr
    check_sym_expr(text)


@pytest.mark.parametrize("text,ok", [
    ("L['x'].size()[0] <= 64", True), ("(L['x'].size()[0] % 2) == 0", True),
    ("L['args'][0]['k'].stride()[1] == 3", True), ("math.floor(L['x'].size()[0] / 2) >= 1", True),
    ("torch.save(L['x'], 'f')", False), ("L['x'].__class__", False), ("L['x'].tolist()", False),
    ("__import__('os')", False), ("math.__dict__", False), ("(lambda: 1)()", False)])
def test_guards(text, ok):
    from attnopt.frontends.pt2_checks import UnsafeProgram, check_guard
    if ok:
        check_guard(text)
    else:
        with pytest.raises(UnsafeProgram):
            check_guard(text)


@pytest.mark.parametrize("loc", ["/etc/hostname", "../../etc/hostname", "sub/../weights.onnx"])
def test_external_data_outside_the_model_folder(external_model, tmp_path, loc):
    """A file may name its weights, not any file on the user's disk (whose bytes the optimized
    model would carry)."""
    model, _ = external_model
    m = onnx.load(str(model), load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = loc
    p = tmp_path / "trav.onnx"
    onnx.save(m, str(p))
    for args in (("inspect", p), ("optimize", p, "-o", tmp_path / "o.onnx")):
        rc, _, err = run(*args)
        assert rc == 4 and "outside the model's folder" in err and one_line(err)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("args,msg", [
    (("--shape", "100000000x100000000", "--window", "3x3"), "more than the simulator handles"),
    (("--shape", "8x8", "--window", "3x3", "--png", "model.pt2"), "must name a .png"),
])
def test_simulate_refuses_what_it_cannot_do(args, msg):
    rc, _, err = run("simulate", *args)
    assert rc == 2 and msg in err and one_line(err), (rc, err)


# ---- attnopt plan: outputs and calibration files -------------------------------------------------

@pytest.fixture(scope="module")
def demo_pt2(tiny_example) -> Path:
    return tiny_example / "tiny_transformer.pt2"


def test_plan_outputs_are_never_inputs(demo_pt2, tmp_path):
    import numpy as np

    model = tmp_path / "m.pt2"
    model.write_bytes(demo_pt2.read_bytes())
    before = model.read_bytes()
    rc, _, err = run("plan", model, "-o", model)
    assert rc == 6 and "input model" in err and one_line(err)
    rc, _, err = run("plan", model, "-o", tmp_path / "p.json", "--report", model)
    assert rc == 6 and one_line(err)
    rc, _, err = run("plan", model, "-o", tmp_path / "p.json", "--report", tmp_path / "p.json")
    assert rc == 6 and one_line(err)
    calib = tmp_path / "c.npz"
    np.savez(calib, a=np.zeros((2, 32), dtype=np.int64), b=np.ones((2, 32), dtype=np.int64))
    rc, _, err = run("plan", model, "-o", calib, "--calibration", calib)
    assert rc == 6 and "calibration file" in err and one_line(err)
    assert model.read_bytes() == before and not (tmp_path / "p.json").exists()


def test_calibration_files_are_data(demo_pt2, tmp_path):
    import numpy as np

    cases = {
        "object": dict(a=np.array([object()], dtype=object)),
        "count": dict(a=np.zeros((2, 32), dtype=np.int64)),
        "rank": dict(a=np.zeros(3, dtype=np.int64), b=np.zeros(3, dtype=np.int64)),
        "shape": dict(a=np.zeros((1, 5), dtype=np.int64), b=np.ones((1, 5), dtype=np.int64)),
        "values": dict(a=np.full((2, 32), 10**9, dtype=np.int64), b=np.ones((2, 32), dtype=np.int64)),
    }
    for name, arrays in cases.items():
        p = tmp_path / f"{name}.npz"
        np.savez(p, **arrays)
        rc, _, err = run("plan", demo_pt2, "-o", tmp_path / "p.json", "--calibration", p)
        assert rc == 2 and "calibration" in err and one_line(err), (name, rc, err)
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 not a zip")
    rc, _, err = run("plan", demo_pt2, "-o", tmp_path / "p.json", "--calibration", tmp_path / "garbage.npz")
    assert rc == 2 and one_line(err)
    rc, _, err = run("plan", demo_pt2, "-o", tmp_path / "p.json", "--calibration", tmp_path / "none.npz")
    assert rc == 3 and one_line(err)
    assert not (tmp_path / "p.json").exists()
