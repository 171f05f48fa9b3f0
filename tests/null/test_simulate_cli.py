"""`attnopt simulate` through its register() hook and typer's CliRunner."""
from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from attnopt.cli.simulate import register


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    register(app)

    @app.command("noop")  # a second command, so "simulate" stays a named subcommand
    def noop() -> None:
        pass

    return app


def run(app, *args):
    return CliRunner().invoke(app, ["simulate", *args])


@pytest.mark.parametrize("stride,bound,perfect", [("1x1", 6.10, False), ("16x1", 8.53, False),
                                                   ("16x16", 10.24, True)])
def test_json_reproduces_flux(app, stride, bound, perfect):
    r = run(app, "--shape", "256x256", "--window", "80x80", "--stride", stride, "--q-tile",
            "16x16", "--kv-tile", "16x8", "--attn-share", "0.5", "--json")
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)
    for k in ("speedup_upper_bound", "flop_speedup", "max_kv_tiles", "mean_kv_tiles",
              "total_kv_tiles", "masked_tiles", "fully_block_sparse", "e2e_speedup"):
        assert k in j
    assert round(j["speedup_upper_bound"], 2) == bound
    assert j["fully_block_sparse"] is perfect
    assert j["e2e_speedup"] == pytest.approx(1 / (0.5 + 0.5 / j["speedup_upper_bound"]))


def test_human_table_and_search(app):
    r = run(app, "--shape", "256x256", "--window", "80", "--q-tile", "16x16", "--kv-tile",
            "16x8", "--search", "--require-block-sparse")
    assert r.exit_code == 0, r.output
    assert "speedup upper bound" in r.stdout and "6.10x" in r.stdout
    assert "best: stride 16x16" in r.stdout


def test_causal_dilation_dynamic_and_runs(app):
    r = run(app, "--shape", "30x48x80", "--window", "6x8x8", "--dilation", "1x2x3", "--causal",
            "1x0x0", "--q-tile", "128", "--kv-tile", "128", "--dynamic", "--json")
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)
    assert j["tiling"] == "run" and j["dynamic_kv"] is True and j["causal"] == [True, False, False]
    r = run(app, "--shape", "64", "--window", "8", "--causal", "true", "--json")
    assert r.exit_code == 0, r.output  # default tiles from the hardware table
    assert json.loads(r.stdout)["causal"] == [True]


def test_png_written_atomically(app, tmp_path):
    out = tmp_path / "sub" / "flux.png"
    r = run(app, "--shape", "256x256", "--window", "80x80", "--stride", "16x1", "--q-tile",
            "16x16", "--kv-tile", "16x8", "--png", str(out))
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["flux.png"]  # no temp file left
    out3 = tmp_path / "video.png"
    r = run(app, "--shape", "12x16x20", "--window", "4x6x6", "--q-tile", "2x4x4", "--kv-tile",
            "2x4x4", "--png", str(out3))
    assert r.exit_code == 0, r.output and out3.exists()


@pytest.mark.parametrize("args,msg", [
    (["--shape", "256x256", "--window", "300x80"], "exceeds length"),
    (["--shape", "256x", "--window", "80x80"], "expected sizes"),
    (["--shape", "256x256", "--window", "80x80x3"], "3 entries"),
    (["--shape", "256x256", "--window", "80x80", "--q-tile", "16x", "--kv-tile", "16x8"],
     "--q-tile"),
    (["--shape", "256x256", "--window", "80x80", "--q-tile", "16x16", "--kv-tile", "128"],
     "both have"),
    (["--shape", "256x256", "--window", "80x80", "--stride", "100x1"], "stride"),
    (["--shape", "256x256", "--window", "80x80", "--causal", "maybe"], "--causal"),
    (["--shape", "256x256", "--window", "80x80", "--attn-share", "2"], "attn-share"),
    (["--shape", "0x4", "--window", "2x2"], "positive"),
])
def test_bad_arguments_exit_2_with_one_line(app, args, msg):
    r = run(app, *args)
    assert r.exit_code == 2
    err = r.stderr.strip()
    assert msg in err and len(err.splitlines()) == 1 and "Traceback" not in r.output
