"""Fuzz cases are data: the torch programs are Python source generated from a case's choices,
so `--replay` / `run_case` check every choice against the grammar's allowed values before any
source is generated. A case with code pasted into a choice is a one-line error, exit code 2,
and nothing of it runs (its payload would write a marker file; the marker never appears)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnopt.testing import fuzz
from attnopt.errors import BadArgument

CASES = Path(__file__).parent / "cases"
BASE = "dropout_module_leaf.json"  # a torch case (bhsd, bmm)


def _payload(marker: Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).write_text('ran')"


def _injected(marker: Path) -> dict[str, dict]:
    """Cases each carrying the payload in one choice, where the generator would paste it into
    the source (the "window" one ran with the old replay: a sliding mask's window is pasted into
    forward() verbatim)."""
    base = json.loads((CASES / BASE).read_text())["choices"]
    code = _payload(marker)
    return {
        "window": dict(base, mask="sliding", window=f"3 + ({code} and 0)"),
        "B": dict(base, B=f"3) if {code} else (3"),
        "dtype": dict(base, dtype=f"float32 if {code} else torch.float32"),
        "mask": dict(base, mask=f"none'); {code}; ('"),
        "extra_key": dict(base, forward=code),
        "int_as_float": dict(base, S=4.0),
        "bool_as_int": dict(base, nan_guard=1),
        "huge_size": dict(base, S=10 ** 9),
    }


@pytest.mark.parametrize("choice", ["window", "B", "dtype", "mask", "extra_key", "int_as_float",
                                    "bool_as_int", "huge_size"])
def test_bad_choices_are_refused_before_any_source(tmp_path, choice):
    marker = tmp_path / "marker"
    c = _injected(marker)[choice]
    for f in (fuzz.run_case, fuzz.torch_source, fuzz.torch_module, fuzz.check_choices):
        with pytest.raises(BadArgument) as e:
            f(c)
        assert e.value.exit_code == 2 and "\n" not in str(e.value)
    key = {"extra_key": "forward", "int_as_float": "S", "bool_as_int": "nan_guard",
           "huge_size": "S"}.get(choice, choice)
    assert repr(key) in str(e.value), str(e.value)
    path = tmp_path / "case.json"
    path.write_text(json.dumps({"seed": 0, "index": 0, "message": "", "choices": c}))
    assert fuzz.main(["--replay", str(path)]) == 2
    assert not marker.exists()


def test_replay_cli_refuses_injected_code(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.json"
    path.write_text(json.dumps({"choices": _injected(marker)["window"]}))
    p = subprocess.run([sys.executable, "-m", "attnopt.testing.fuzz", "--replay", str(path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
    assert "'window'" in p.stderr and p.stdout == ""
    assert not marker.exists()


@pytest.mark.parametrize("content,why", [
    (b"not json at all", "not JSON"),
    (b"[" * 100000 + b"]" * 100000, "not JSON"),
    (b"[1, 2]", "no \"choices\""),
    (b'{"choices": [1]}', "must be an object"),
    (b'{"choices": {"kind": "python"}}', "'kind'"),
])
def test_unreadable_case_files(tmp_path, capsys, content, why):
    path = tmp_path / "case.json"
    path.write_bytes(content)
    assert fuzz.main(["--replay", str(path)]) == 2
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1
    assert fuzz.main(["--replay", str(tmp_path / "missing.json")]) == 2


def test_every_stored_case_and_sampled_case_is_valid():
    for f in sorted(CASES.glob("*.json")):
        fuzz.load_case(f)
    for kind in ("torch", "onnx"):
        for i in range(2000):
            fuzz.check_choices(fuzz.sample(random.Random(f"{i}-{kind}"), kind))


def test_valid_replay_still_runs(capsys):
    assert fuzz.main(["--replay", str(CASES / BASE)]) == 0
    assert capsys.readouterr().out.startswith("ok ")


def test_max_rel_inf_and_nan():
    a = torch.tensor([1.0, float("inf"), float("nan"), 2.0])
    assert fuzz.max_rel(a, a.clone()) == 0.0
    assert fuzz.max_rel(a, torch.tensor([1.0, float("inf"), 0.0, 2.0])) == 0.0  # NaN: undefined
    for i, v in ((0, float("nan")), (1, 3.0), (1, float("-inf")), (3, float("inf"))):
        b = a.clone()
        b[i] = v
        assert fuzz.max_rel(a, b) == float("inf"), (i, v)
