"""Plans are input: a plan file, dict or object is checked field by field when it is loaded
(schema, types, ranges, sizes, nesting), and each choice against the site it names when it is
applied; every bad one is a one-line error naming the field, attnopt.errors.BadArgument, exit
code 2. `--policy exact` refuses a plan with approximate choices; an approximate plan applied
says so with its max_error. Bad --policy / --onnx-op / --target values exit 2 up front."""
from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from zoo.testing import run_cli as run

import attnopt
from attnopt.errors import BadArgument, InputNotFound
from attnopt.planner import schema as plan_schema
from attnopt.planner.plan import Plan
from attnopt.planner.search import make_plan
from attnopt.planner.schema import BadPlan, check_plan_fits

TOKENS = 33  # a 32-token grid after one leading token: small enough for a fast hand-made approximation


from zoo.small import Attn, Net  # noqa: E402,F401


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(exported program, .pt2 path, exact plan JSON) of a two-site model."""
    torch.manual_seed(0)
    model, x = Net().eval(), (torch.randn(1, TOKENS, 32),)
    ep = torch.export.export(model, x)
    path = tmp_path_factory.mktemp("plan_input") / "m.pt2"
    torch.export.save(ep, path)
    plan = make_plan(ep, policy="exact", target="cpu")
    assert [s.site for s in plan.sites] == ["blocks.0", "blocks.1"]
    return ep, path, plan.to_json()


def approx_json(exact: dict, max_error: float = 1.0) -> dict:
    """The exact plan with a hand-made approximation at the first site: a 1-D GNA window of 8
    over the 32 tokens after the first one (what the planner writes, edited by hand)."""
    d = copy.deepcopy(exact)
    d["policy"], d["max_error"] = "approx", max_error
    d["sites"][0]["choice"].update(
        name="approx:gna(grid 32 window 8 stride 1 +1 global)", family="block_sparse_gna",
        exact=False, q_tile=[16], kv_tile=[16], leading=1,
        layout={"shape": [32], "window": [8], "stride": [1], "dilation": [1], "causal": [False]})
    return d


def one_line(err: str) -> bool:
    return "Traceback" not in err and len(err.strip().splitlines()) == 1


def _set(path: str, value):
    """A mutation setting `path` (dotted, [i] indices) of a plan dict; value DELETE removes it."""
    def apply(d):
        keys = path.replace("[", ".").replace("]", "").split(".")
        node = d
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = int(keys[-1]) if isinstance(node, list) else keys[-1]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
        return d
    return apply


DELETE = object()

# (mutation of the approximate plan, the field the message must name)
BAD_FIELDS = {
    "max_error_huge": (_set("max_error", 1e9), "'max_error'"),
    "max_error_zero": (_set("max_error", 0.0), "'max_error'"),
    "max_error_negative": (_set("max_error", -0.1), "'max_error'"),
    "max_error_string": (_set("max_error", "0.1"), "'max_error'"),
    "max_error_inf": (_set("max_error", math.inf), "'max_error'"),
    "unknown_field": (_set("extra", 1), "'extra'"),
    "missing_sites": (_set("sites", DELETE), "'sites'"),
    "missing_max_error": (_set("max_error", DELETE), "'max_error'"),
    "policy": (_set("policy", "fast"), "'policy'"),
    "target": (_set("target", "tpu"), "'target'"),
    "sites_not_list": (_set("sites", {"a": 1}), "'sites'"),
    "site_unknown_field": (_set("sites[0].colour", "red"), "'sites[0].colour'"),
    "site_missing_status": (_set("sites[0].status", DELETE), "'sites[0].status'"),
    "site_name_type": (_set("sites[0].site", 7), "'sites[0].site'"),
    "status_value": (_set("sites[1].status", "done"), "'sites[1].status'"),
    "planned_without_choice": (_set("sites[1].choice", None), "'sites[1].choice'"),
    "duplicate_site": (_set("sites[1].site", "blocks.0"), "'sites[1].site'"),
    "family": (_set("sites[1].choice.family", "warp_speed"), "'sites[1].choice.family'"),
    "exact_type": (_set("sites[1].choice.exact", "yes"), "'sites[1].choice.exact'"),
    "tile_zero": (_set("sites[0].choice.q_tile", [0]), "'sites[0].choice.q_tile[0]'"),
    "tile_negative": (_set("sites[1].choice.kv_tile", [-64]), "'sites[1].choice.kv_tile[0]'"),
    "tile_float": (_set("sites[1].choice.kv_tile", [64.5]), "'sites[1].choice.kv_tile[0]'"),
    "tile_absurd": (_set("sites[1].choice.kv_tile", [1 << 40]), "'sites[1].choice.kv_tile[0]'"),
    "tile_rank": (_set("sites[0].choice.q_tile", [4, 4]), "'sites[0].choice.q_tile'"),
    "window_beyond_grid": (_set("sites[0].choice.layout.window", [33]),
                           "'sites[0].choice.layout.window[0]'"),
    "window_zero": (_set("sites[0].choice.layout.window", [0]), "'sites[0].choice.layout.window[0]'"),
    "stride_zero": (_set("sites[0].choice.layout.stride", [0]), "'sites[0].choice.layout.stride[0]'"),
    "stride_beyond_window": (_set("sites[0].choice.layout.stride", [9]),
                             "'sites[0].choice.layout.stride[0]'"),
    "dilation_beyond_grid": (_set("sites[0].choice.layout.dilation", [5]),
                             "'sites[0].choice.layout.window[0]'"),
    "shape_absurd": (_set("sites[0].choice.layout.shape", [1 << 40]),
                     "'sites[0].choice.layout.shape[0]'"),
    "shape_rank_mismatch": (_set("sites[0].choice.layout.window", [8, 8]),
                            "'sites[0].choice.layout.window'"),
    "causal_type": (_set("sites[0].choice.layout.causal", [1]), "'sites[0].choice.layout.causal[0]'"),
    "layout_missing_field": (_set("sites[0].choice.layout.stride", DELETE),
                             "'sites[0].choice.layout.stride'"),
    "leading_negative": (_set("sites[0].choice.leading", -1), "'sites[0].choice.leading'"),
    "leading_bool": (_set("sites[0].choice.leading", True), "'sites[0].choice.leading'"),
    "heads_negative": (_set("sites[0].choice.heads", [-1]), "'sites[0].choice.heads[0]'"),
    "heads_twice": (_set("sites[0].choice.heads", [1, 1]), "'sites[0].choice.heads'"),
    "heads_on_exact": (_set("sites[1].choice.heads", [0]), "'sites[1].choice.heads'"),
    "name_exact_mismatch": (_set("sites[0].choice.exact", True), "'sites[0].choice.name'"),
    "name_markup": (_set("sites[1].choice.name", "exact:[red]x"), "'sites[1].choice.name'"),
    "approx_in_exact_policy": (_set("policy", "exact"), "'sites[0].choice.exact'"),
    "approx_without_layout": (lambda d: _set("sites[0].choice.family", "dense")(
        _set("sites[0].choice.layout", None)(d)), "'sites[0].choice.exact'"),
    "predicted_nan": (_set("sites[1].choice.predicted.time_s", math.nan),
                      "'sites[1].choice.predicted.time_s'"),
    "reason_huge": (_set("sites[1].reason", "x" * 20000), "'sites[1].reason'"),
    "spec_deep": (_set("sites[1].spec", json.loads("[" * 40 + "]" * 40)), "'sites[1].spec"),
    "walk_type": (_set("walk", [{"step": 1}]), "'walk[0]"),
    "measured_type": (_set("measured.rel_l2", "small"), "'measured.rel_l2'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_bad_field_is_named(small, case):
    _ep, _path, exact = small
    mutate, field = BAD_FIELDS[case]
    d = mutate(approx_json(exact))
    with pytest.raises(BadArgument) as e:
        Plan.from_json(d)
    msg = str(e.value)
    assert field in msg and "\n" not in msg, msg
    assert e.value.exit_code == 2 and isinstance(e.value, ValueError)


def test_valid_plans_load_and_round_trip(small, tmp_path):
    _ep, _path, exact = small
    for d in (exact, approx_json(exact)):
        plan = Plan.from_json(d)
        assert Plan.from_json(plan.to_json()) == plan
        p = plan.save(tmp_path / "p.json")
        assert Plan.load(p) == plan


@pytest.mark.parametrize("content,why", [
    (b"this is not json {", "not a JSON plan"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"[1, 2, 3]", "not an object"),
    (b'"a string"', "not an object"),
    (b"[" * 200000 + b"]" * 200000, "nested too deeply"),
    (b'{"format": "attnopt.plan", "version": 1, "max_error": NaN}', "'max_error'"),
    (b'{"format": "attnopt.plan", "version": 2}', "version"),
    (b'{"format": "other"}', "not an attnopt plan"),
])
def test_unreadable_plan_files(tmp_path, content, why):
    p = tmp_path / "plan.json"
    p.write_bytes(content)
    with pytest.raises(BadArgument) as e:
        Plan.load(p)
    assert why in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_plan_file_size_cap_directory_and_missing(tmp_path, monkeypatch):
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"format": "attnopt.plan", "pad": "x" * 5000}))
    monkeypatch.setattr(plan_schema, "MAX_PLAN_BYTES", 4096)
    with pytest.raises(BadArgument, match="larger than"):
        Plan.load(big)
    with pytest.raises(BadArgument, match="directory"):
        Plan.load(tmp_path)
    with pytest.raises(InputNotFound):
        Plan.load(tmp_path / "missing.json")


def test_api_checks_plans_objects_and_dicts(small):
    ep, path, exact = small
    bad = approx_json(exact)
    bad["sites"][0]["choice"]["layout"]["window"] = [40]
    with pytest.raises(BadArgument, match=r"sites\[0\]\.choice\.layout\.window\[0\]"):
        attnopt.optimize(ep, plan=bad)
    obj = dataclasses.replace(Plan.from_json(approx_json(exact)), max_error=1e9)
    with pytest.raises(BadArgument, match="'max_error'"):
        attnopt.optimize(ep, plan=obj)
    with pytest.raises(BadArgument, match="plan must be"):
        attnopt.optimize(ep, plan=42)
    # the case of the issue: a coarse window applied with max_error 1e9 changed outputs by 11%
    with pytest.raises(BadArgument, match="max_error"):
        attnopt.optimize(path, plan=approx_json(exact, max_error=1e9))


def test_api_policy_exact_refuses_approximate_plan(small):
    ep, _path, exact = small
    with pytest.raises(BadArgument, match="approximate"):
        attnopt.optimize(ep, policy="exact", plan=approx_json(exact))
    res = attnopt.optimize(ep, plan=approx_json(exact))  # no policy: the plan's
    assert res.sites[0].variant.startswith("approx:") and res.sites[0].status == "rewritten"
    res = attnopt.optimize(ep, policy="exact", plan=exact)
    assert all(s.status == "rewritten" and s.variant.startswith("exact:") for s in res.sites)
    for kwargs in ({"policy": "fast"}, {"onnx_op": "bogus"}, {"policy": "approx"}):
        with pytest.raises(BadArgument):
            attnopt.optimize(ep, **kwargs)


# (mutation, field) of choices that are well-formed but do not fit the model's sites
MISFITS = {
    "no_such_site": (_set("sites[1].site", "blocks.7"), "'sites[1].site'"),
    "head_out_of_range": (_set("sites[0].choice.heads", [4]), "'sites[0].choice.heads'"),
    "grid_not_the_sites": (_set("sites[0].choice.layout.shape", [16]),
                           "'sites[0].choice.layout.shape'"),
    "exact_claim_on_approximation": (
        lambda d: _set("sites[0].choice.name", "exact:gna(grid 32 window 8)")(
            _set("sites[0].choice.exact", True)(d)), "'sites[0].choice.exact'"),
    "window_not_the_masks": (
        lambda d: _set("sites[1].choice.window", [3, 0])(_set("sites[1].choice.family", "sliding_window")(d)),
        "'sites[1].choice.window'"),
}


@pytest.mark.parametrize("case", sorted(MISFITS))
def test_choice_must_fit_its_site(small, case):
    ep, _path, exact = small
    mutate, field = MISFITS[case]
    d = mutate(approx_json(exact))
    Plan.from_json(d)  # well-formed
    with pytest.raises(BadArgument) as e:
        attnopt.optimize(ep, plan=d)
    assert field in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_heads_must_be_whole_kv_groups(small):
    ep, _path, exact = small
    sites = attnopt.inspect(ep).sites
    gqa = [dataclasses.replace(s, spec=dataclasses.replace(s.spec, num_kv_heads=2)) for s in sites]
    d = approx_json(exact)
    d["sites"][0]["choice"]["heads"] = [0, 1]  # group 0 (heads 0-1): fine
    check_plan_fits(Plan.from_json(d), gqa)
    d["sites"][0]["choice"]["heads"] = [1, 2]  # half of each group
    with pytest.raises(BadPlan, match=r"'sites\[0\]\.choice\.heads'.*split KV group"):
        check_plan_fits(Plan.from_json(d), gqa)


# ---- the command line ----------------------------------------------------------------------------

def test_cli_bad_plan_exits_2(small, tmp_path):
    _ep, path, exact = small
    out = tmp_path / "o.pt2"
    for name, d in (("huge_error", approx_json(exact, max_error=1e9)),
                    ("bad_stride", _set("sites[0].choice.layout.stride", [0])(approx_json(exact))),
                    ("no_site", _set("sites[1].site", "blocks.7")(approx_json(exact)))):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(d))
        rc, _, err = run("optimize", path, "-o", out, "--plan", p)
        assert rc == 2 and one_line(err) and "plan field" in err, (name, err)
        assert not out.exists()
    junk = tmp_path / "junk.json"
    junk.write_bytes(b"\x00\x01 not json")
    rc, _, err = run("optimize", path, "-o", out, "--plan", junk)
    assert rc == 2 and one_line(err) and "junk.json" in err and not out.exists()


def test_cli_policy_exact_with_approximate_plan_exits_2(small, tmp_path):
    _ep, path, exact = small
    p, out = tmp_path / "approx.json", tmp_path / "o.pt2"
    p.write_text(json.dumps(approx_json(exact, max_error=0.5)))
    rc, _, err = run("optimize", path, "-o", out, "--plan", p, "--policy", "exact")
    assert rc == 2 and one_line(err) and "approximate" in err and not out.exists()


def test_cli_says_when_an_approximate_plan_is_applied(small, tmp_path):
    _ep, path, exact = small
    p, out = tmp_path / "approx.json", tmp_path / "o.pt2"
    p.write_text(json.dumps(approx_json(exact, max_error=0.5)))
    rc, stdout, err = run("optimize", path, "-o", out, "--plan", p, "--json")
    assert rc == 0, err
    notes = [line for line in err.splitlines() if "approximate plan" in line]
    assert len(notes) == 1 and "max_error 0.5" in notes[0]
    assert json.loads(stdout)["sites_rewritten"] == 2 and out.exists()
    p.write_text(json.dumps(exact))  # an exact plan: nothing to say
    rc, _, err = run("optimize", path, "-o", tmp_path / "o2.pt2", "--plan", p, "--json")
    assert rc == 0 and "approximate" not in err


def test_cli_bad_option_values_exit_2(tmp_path):
    missing = tmp_path / "missing.pt2"  # option values are checked before the files
    for args in (["optimize", missing, "-o", tmp_path / "o.pt2", "--policy", "fast"],
                 ["optimize", missing, "-o", tmp_path / "o.onnx", "--onnx-op", "bogus"],
                 ["plan", missing, "-o", tmp_path / "p.json", "--policy", "fast"],
                 ["plan", missing, "-o", tmp_path / "p.json", "--target", "tpu"],
                 ["plan", missing, "-o", tmp_path / "p.json", "--max-error", "5"],
                 ["plan", missing, "-o", tmp_path / "p.json", "--max-error", "nan"]):
        rc, _, err = run(*args)
        assert rc == 2 and one_line(err) and args[-2] in err and args[-1] in err, (args, rc, err)


def test_cli_policy_approx_needs_a_plan(small, tmp_path):
    _ep, path, _exact = small
    rc, _, err = run("optimize", path, "-o", tmp_path / "o.pt2", "--policy", "approx")
    assert rc == 2 and one_line(err) and "needs a plan" in err
