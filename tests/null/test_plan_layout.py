"""User-given token layouts in `attnopt plan --layout` / `attnopt.plan(layout=)` and the plan JSON
(planner/layout.py), a reason for every site without an approximation (in the plan, the report
and the CLI table), and measured speedups beside predicted ones (`--time`, planner/timing.py)."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

import attnopt
from attnopt.cost.hardware import get_profile
from attnopt.cost.variants import approx_candidates
from attnopt.errors import BadArgument
from attnopt.planner.layout import parse_layouts, parse_segments
from attnopt.planner.plan import Plan
from attnopt.planner.schema import BadPlan
from attnopt.planner.search import make_plan
from zoo.sharpen import sharpen_

T, G = 8, (16, 16)  # text tokens, image grid: 264 tokens in the joint sequence, 256 in the image's


class Block(nn.Module):
    def __init__(self, d=16, h=2):
        super().__init__()
        self.qkv, self.o, self.h = nn.Linear(d, 3 * d), nn.Linear(d, d), h

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) * (D // self.h) ** -0.5
        return x + self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D))


class Joint(nn.Module):
    """Text tokens then image patches (a conv patch embedding), joint attention over all
    T + prod(G) tokens (`joint`), then attention over the image tokens alone (`image`)."""

    def __init__(self, d=16, text_first=True):
        super().__init__()
        self.pe, self.txt = nn.Conv2d(3, d, 2, 2), nn.Linear(4, d)
        self.joint, self.image, self.text_first = Block(d), Block(d), text_first

    def forward(self, img, text):
        x = self.pe(img).flatten(2).transpose(1, 2)
        t = self.txt(text)
        j = self.joint(torch.cat([t, x] if self.text_first else [x, t], 1))
        return self.image(j[:, T:] if self.text_first else j[:, :-T])


def _inputs(seed=0, img=2 * G[0]):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, img, img, generator=g), torch.randn(1, T, 4, generator=g)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return sharpen_(Joint()), _inputs()


@pytest.fixture(scope="module")
def pt2(model, tmp_path_factory):
    m, x = model
    p = tmp_path_factory.mktemp("layout") / "joint.pt2"
    torch.export.save(torch.export.export(m, x), p)
    return p


def _app():
    from attnopt.cli import app
    from attnopt.cli.plan import register

    if not any(c.name == "plan" for c in app.registered_commands):
        register(app)
    return app


def _cli(*args):
    return CliRunner().invoke(_app(), ["plan", *map(str, args)])


def _layouts(plan):
    return {s.site: (None if s.token_layout is None else (s.token_layout.describe(), s.token_layout.source))
            for s in plan.sites}


# ---- the syntax --------------------------------------------------------------------------------

def test_segments_parse_in_token_order():
    lay = parse_segments("text:512,grid:64x64", "x")
    assert [s.describe() for s in lay] == ["text:512", "grid:64x64"]
    assert [s.describe() for s in parse_segments(" grid:8x32x32 , text:226 ", "x")] == \
        ["grid:8x32x32", "text:226"]
    assert [s.tokens for s in parse_segments("cls:1,grid:32x32,reg:4", "x")] == [1, 1024, 4]
    assert parse_segments("sink:4,GRID:1020", "x")[1].shape == (1020,)
    req = parse_layouts(["joint=text:8,grid:8x8", "64=grid:8x8", "grid:6x12"])
    assert set(req.by_site) == {"joint"} and set(req.by_length) == {64} and req.every is not None
    req = parse_layouts({"joint": "text:8,grid:8x8", 64: [{"kind": "grid", "shape": [8, 8]}],
                         None: "grid:8x9"})
    assert req.by_length[64][0][0].shape == (8, 8) and req.every[0][0].shape == (8, 9)


@pytest.mark.parametrize("spec,words", [
    ("", "no segments"),
    ("text:8", "no grid segment"),
    ("text,grid:8x8", "not NAME:TOKENS"),
    ("text:8;grid:8x8", "token count must be an integer"),
    ("grid:8x8x2x2", "1 to 3 extents"),
    ("grid:8xa", "1 to 3 extents"),
    ("grid:1x64", "[2,"),
    ("text:0,grid:8x8", "token count must be an integer in [1,"),
    ("te xt:8,grid:8x8", "a global segment's name"),
    ("grid:8x8,grid:8x8", "2 grid segments"),
    ("grid:4x8,text:8,grid:4x8", "global segment text:8 sits between two grids"),
    ("72=grid:8x8", "add up to 64 tokens, not 72"),
    (["grid:8x8", "grid:4x16"], "already given"),
    (["joint=grid:8x8", "joint=grid:4x16"], "already has a layout"),
    (3.5, "not float"),
])
def test_malformed_specs_are_one_line(spec, words):
    with pytest.raises(BadArgument) as e:
        parse_layouts(spec)
    msg = str(e.value)
    assert words in msg and "\n" not in msg, msg


# ---- the CLI -------------------------------------------------------------------------------------

def test_cli_layout_per_site_length_and_every_site(pt2, tmp_path):
    out = tmp_path / "plan.json"
    r = _cli(pt2, "-o", out, "--target", "cpu")
    assert r.exit_code == 0, r.output
    inferred = _layouts(Plan.load(out))
    assert inferred["joint"] == ("global:8,grid:16x16", "inferred")  # text first, read from the cat
    # per site: text first, named
    r = _cli(pt2, "-o", out, "--target", "cpu", "--layout", "joint=text:8,grid:16x16")
    assert r.exit_code == 0, r.output
    got = _layouts(Plan.load(out))
    assert got["joint"] == ("text:8,grid:16x16", "given") and got["image"] != got["joint"]
    assert "text:8,grid:16x16 (given)" in r.output  # the CLI table
    # per length, and every site (the joint site by its own spec)
    r = _cli(pt2, "-o", out, "--target", "cpu", "--layout", "256=grid:8x32",
             "--layout", "joint=grid:16x16,text:8")
    assert r.exit_code == 0, r.output
    assert _layouts(Plan.load(out)) == {"joint": ("grid:16x16,text:8", "given"),
                                         "image": ("grid:8x32", "given")}
    r = _cli(pt2, "-o", out, "--target", "cpu", "--layout", "cls:1,grid:16x16",
             "--layout", "joint=cls:1,grid:15x17,reg:8")
    assert r.exit_code == 2 and "257 tokens, but site 'image' has 256" in r.output, r.output
    r = _cli(pt2, "-o", out, "--target", "cpu", "--layout", "grid:16x16",
             "--layout", "joint=cls:2,grid:15x17,reg:7")
    assert r.exit_code == 0, r.output
    assert _layouts(Plan.load(out)) == {"joint": ("cls:2,grid:15x17,reg:7", "given"),
                                         "image": ("grid:16x16", "given")}


@pytest.mark.parametrize("spec,words", [
    ("joint=text:8,grid:16x16x", "1 to 3 extents"),
    ("joint=grid:16x16,text:9", "add up to 265 tokens, but site 'joint' has 264"),
    ("attn9=grid:16x16", "no attention site 'attn9' (its sites: joint, image)"),
    ("100=grid:10x10", "no self-attention site has 100 tokens (their lengths: 256, 264)"),
    ("grid:12x22", "add up to 264 tokens, but site 'image' has 256"),
    ("grid:8x4,text:4,grid:4x8", "sits between two grids"),
])
def test_cli_bad_layouts_exit_2_without_output(pt2, tmp_path, spec, words):
    out = tmp_path / "plan.json"
    r = _cli(pt2, "-o", out, "--target", "cpu", "--layout", spec)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --layout") and words in lines[0], r.output
    assert not out.exists()


def test_cli_help_documents_the_syntax():
    r = CliRunner().invoke(_app(), ["plan", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "--layout" in r.output and "text:512,grid:64x64" in r.output and "--time" in r.output


# ---- Python, candidates, the JSON ---------------------------------------------------------------

@pytest.fixture(scope="module")
def smooth():
    """Image first, text after it. Default init, not sharpened: sharp random attention is global
    and no window fits any budget; smooth attention is where windows carry (FACTS.md)."""
    torch.manual_seed(0)
    return Joint(text_first=False).eval(), _inputs()


@pytest.fixture(scope="module")
def approx_plan(smooth):
    """The text given after the grid: the joint site's candidates keep 8 trailing globals."""
    m, x = smooth
    return make_plan(m, x, policy="approx", max_error=1.0, target="h100",
                     layout={"joint": "grid:16x16,text:8", 256: "grid:16x16"})


def test_given_layout_gets_gna_candidates_with_its_globals(smooth, approx_plan):
    joint = approx_plan.site("joint")
    assert (joint.token_layout.describe(), joint.token_layout.source) == ("grid:16x16,text:8", "given")
    c = joint.choice
    assert not c.exact and c.variant.layout.shape == G and (c.leading, c.trailing) == (0, 8), c
    assert joint.spec["token_grid"]["trailing"] == 8  # the spec the plan records is the given one
    res = attnopt.optimize(smooth[0], smooth[1], plan=approx_plan)  # applied with 8 trailing tokens
    gna = [n for n in res.model.graph.nodes if "gna_attention" in str(n.target)]
    assert any(n.args[10] == 0 and len(n.args) > 13 and n.args[13] == 8 for n in gna), [n.args[10:] for n in gna]
    # and the candidates themselves: leading, trailing or both, as given
    site_spec = next(s for s in attnopt.inspect(*smooth).sites if s.name == "joint").spec
    from attnopt.planner.layout import TokenLayout
    from dataclasses import replace

    for text, want in (("text:8,grid:16x16", (8, 0)), ("grid:16x16,text:8", (0, 8)),
                       ("cls:1,grid:16x16,reg:7", (1, 7))):
        grid = TokenLayout(parse_segments(text, "t")).token_grid()
        cands = approx_candidates(replace(site_spec, token_grid=grid), get_profile("h100"))
        assert cands and all((c.leading, c.trailing) == want and c.variant.layout.shape == G
                             for c in cands), text


def test_near_miss_layouts_give_no_grid_candidates(model):
    """A layout whose grid does not cover the tokens is refused; a causal site takes only sinks
    then a 1-D grid."""
    m, x = model
    with pytest.raises(BadArgument, match="add up to 264 tokens, but site 'image' has 256"):
        make_plan(m, x, target="cpu", layout={"image": "text:8,grid:16x16"})
    with pytest.raises(BadArgument, match=r"site 'attention_1' is cross-attention \(40 queries, 8 keys\)"):
        make_plan(Cross(), (torch.randn(1, 40, 16), torch.randn(1, 8, 16)), target="cpu",
                  layout={"attention_1": "grid:5x8"})
    causal = Causal()
    with pytest.raises(BadArgument, match="is causal: give sinks then one 1-D grid"):
        make_plan(causal, (torch.randn(1, 64, 16),), target="cpu", layout="grid:8x8")
    # sinks then a 1-D grid: the causal window's candidates keep the given sinks (4 by default)
    from attnopt.planner.layout import TokenLayout
    from dataclasses import replace

    spec = attnopt.inspect(causal, (torch.randn(1, 512, 16),)).sites[0].spec
    grid = TokenLayout(parse_segments("sink:2,grid:510", "t")).token_grid()
    for given, want in ((True, 2), (False, 4)):
        cands = approx_candidates(replace(spec, token_grid=grid), get_profile("h100"), given=given)
        assert cands and all(c.leading == want and c.trailing == 0 and c.variant.layout.causal == (True,)
                             for c in cands), (given, cands)


def test_python_api_and_json_round_trip(approx_plan, tmp_path):
    plan = approx_plan
    assert Plan.from_json(plan.dumps()) == plan
    d = json.loads(plan.dumps())
    j = next(s for s in d["sites"] if s["site"] == "joint")
    assert j["token_layout"] == {"source": "given", "segments": [
        {"kind": "grid", "shape": [16, 16]}, {"kind": "global", "name": "text", "tokens": 8}]}
    assert Plan.load(plan.save(tmp_path / "p.json")) == plan


def _edit(d, **segments):
    d = copy.deepcopy(d)
    for s in d["sites"]:
        if s["site"] in segments:
            s["token_layout"]["segments"] = segments[s["site"]]
    return d


def _joint(d):
    return next(s for s in d["sites"] if s["site"] == "joint")


@pytest.mark.parametrize("edit,field,words", [
    (lambda j: j["token_layout"]["segments"].append({"kind": "global", "name": "x", "tokens": 0}),
     "token_layout.segments[2].tokens", "out of range"),
    (lambda j: j["token_layout"]["segments"].insert(0, {"kind": "grid", "shape": [2, 2]}),
     "token_layout.segments", "2 grid segments"),
    (lambda j: j["token_layout"]["segments"].__setitem__(0, {"kind": "grid", "shape": [8, 32]}),
     "choice.layout.shape", "16x16, but the site's token_layout (grid:8x32,text:8) has grid 8x32"),
    (lambda j: j["token_layout"].__setitem__("segments", [
        {"kind": "global", "name": "text", "tokens": 8}, {"kind": "grid", "shape": [16, 16]}]),
     "choice.leading", "0, but the site's token_layout (text:8,grid:16x16) has 8 global tokens before"),
    (lambda j: j["token_layout"].__setitem__("source", "guessed"), "token_layout.source", "not one of"),
    (lambda j: j["token_layout"]["segments"][0].__setitem__("tokens", 250), "segments[0].tokens",
     "250, but grid 16x16 holds 256"),
])
def test_hand_edited_layouts_are_checked(approx_plan, edit, field, words):
    d = json.loads(approx_plan.dumps())
    edit(_joint(d))
    with pytest.raises(BadPlan) as e:
        Plan.from_json(d)
    assert field in str(e.value) and words in str(e.value), str(e.value)


def test_hand_edited_segments_are_applied(smooth, approx_plan):
    """Text moved to the front by hand (the choice's leading/trailing deleted, so the layout's
    are taken): the applied GNA op runs with 8 leading and no trailing tokens."""
    m, x = smooth
    d = json.loads(approx_plan.dumps())
    j = _joint(d)
    j["token_layout"]["segments"] = [{"kind": "global", "name": "text", "tokens": 8},
                                     {"kind": "grid", "shape": [16, 16]}]
    del j["choice"]["leading"], j["choice"]["trailing"]
    edited = Plan.from_json(d)
    c = edited.site("joint").choice
    assert (c.leading, c.trailing) == (8, 0)
    res = attnopt.optimize(m, x, plan=edited)
    gna = [n for n in res.model.graph.nodes if "gna_attention" in str(n.target)]
    assert gna and any(n.args[10] == 8 and (len(n.args) < 14 or n.args[13] == 0) for n in gna), \
        [n.args[10:] for n in gna]
    # a layout that does not add up to the model's site is refused when applied
    bad = _edit(json.loads(edited.dumps()), image=[{"kind": "grid", "shape": [16, 16]},
                                                   {"kind": "global", "name": "text", "tokens": 16}])
    del next(s for s in bad["sites"] if s["site"] == "image")["choice"]["leading"]
    with pytest.raises(BadPlan, match=r"sites\[1\].token_layout.segments.*272 tokens, but site 'image' has 256"):
        attnopt.optimize(m, x, plan=bad)


# ---- reasons -------------------------------------------------------------------------------------

class Cross(nn.Module):
    """Self-attention with a bias computed from the inputs (`attn`), then cross-attention to 8
    context tokens (`cross`), then a short 8-token self-attention (`short`)."""

    def __init__(self, d=16):
        super().__init__()
        self.qkv, self.b = nn.Linear(d, 3 * d), nn.Linear(d, 2)
        self.q, self.kv, self.s = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, 3 * d)

    def forward(self, x, ctx):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4)
        bias = self.b(x).permute(0, 2, 1)[:, :, None, :]
        x = x + ((q @ k.transpose(-1, -2) * 0.35 + bias).softmax(-1) @ v).transpose(1, 2).reshape(B, N, 16)
        q = self.q(x).view(B, N, 2, 8).transpose(1, 2)
        k, v = self.kv(ctx).view(B, -1, 2, 2, 8).permute(2, 0, 3, 1, 4)
        x = x + ((q @ k.transpose(-1, -2) * 0.35).softmax(-1) @ v).transpose(1, 2).reshape(B, N, 16)
        q, k, v = self.s(ctx).view(B, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
        y = ((q @ k.transpose(-1, -2) * 0.35).softmax(-1) @ v).transpose(1, 2).reshape(B, -1, 16)
        return x.sum(1) + y.sum(1)


class Causal(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_every_site_without_candidates_says_why(tmp_path):
    torch.manual_seed(0)
    m, x = sharpen_(Cross()), (torch.randn(1, 40, 16), torch.randn(1, 8, 16))
    plan = make_plan(m, x, policy="approx", max_error=0.05, target="h100")
    why = {s.site: s.reason for s in plan.sites}
    assert len(why) == 3 and all(s.choice is not None and s.choice.exact for s in plan.sites)
    texts = list(why.values())
    assert any("inputs" in t and "window" in t for t in texts), why  # the input-dependent bias
    assert any("cross-attention" in t for t in texts), why
    assert any("8 tokens (fewer than 32)" in t for t in texts), why
    assert Plan.from_json(plan.dumps()) == plan
    from attnopt.cli.plan import render_report, sites_table

    html = render_report(plan, "cross")
    for t in texts:
        assert t.replace("'", "&#x27;") in html
    from rich.console import Console

    con = Console(width=400, record=True, file=open(tmp_path / "t.txt", "w"))
    con.print(sites_table(plan))
    shown = con.export_text()
    assert all(t[:60] in shown for t in texts), shown
    # the exact policy says why too
    exact = make_plan(m, x, policy="exact", target="h100")
    assert all(s.reason for s in exact.sites)


def test_grid_site_with_nothing_cheaper_says_so():
    """An 8x8 grid and 8 text tokens on an H100: a grid, but no GNA layout predicted faster."""
    torch.manual_seed(0)
    m, x = sharpen_(Joint()), _inputs(img=16)
    plan = make_plan(m, x, policy="approx", max_error=0.05, target="h100",
                     layout={"joint": "grid:8x8,text:8"})
    j = plan.site("joint")
    assert j.choice.exact and j.reason == ("no approximate candidate: no GNA layout over grid 8x8 "
                                           "+8 trailing global is predicted faster than the exact "
                                           "kernel on H100 SXM"), j.reason


# ---- predicted beside measured ------------------------------------------------------------------

def test_timed_plan_shows_measured_beside_predicted(model, tmp_path):
    m, x = model
    plan = make_plan(m, x, policy="exact", target="cpu", time_kernels=True)
    assert all(s.timed is not None and s.timed.time_s > 0 and s.timed.device == "cpu" for s in plan.sites)
    assert plan.measured["timed_sites"] == 2 and plan.measured["attention_speedup"] == 1.0
    assert all(s.timed.speedup == 1.0 for s in plan.sites)  # exact choices: the baseline itself
    assert Plan.from_json(plan.dumps()) == plan
    from attnopt.cli.plan import render_report

    html = render_report(plan, "joint")
    assert "speedup: predicted / measured" in html
    assert re.search(r"x / [0-9.]+x \([0-9.]+ (us|ms|s) / [0-9.]+ (us|ms|s) on cpu\)", html), html
    assert "measured attention speedup" in html
    with pytest.raises(BadArgument, match="times kernels on this machine"):
        make_plan(m, x, target="h100", time_kernels=True)
    untimed = make_plan(m, x, policy="exact", target="cpu")
    assert "No site was timed" in render_report(untimed, "joint")


def test_plans_for_this_machines_unprofiled_gpu(approx_plan, monkeypatch):
    """Target "cuda" (a GPU described by its properties, codegen.device) is a plan target only on
    such a machine; a plan made there loads, and its report renders without that profile."""
    with pytest.raises(BadArgument, match="target 'cuda' is this machine's GPU"):
        make_plan(nn.Linear(2, 2), (torch.randn(1, 2),), target="cuda")
    d = {**json.loads(approx_plan.dumps()), "target": "cuda"}
    from attnopt.cli.plan import render_report

    assert "No profile of target cuda" in render_report(Plan.from_json(d), "gpu")


def test_gna_choice_is_timed_with_its_globals(smooth, approx_plan):
    """The GNA op with 8 trailing globals, timed beside the site's dense kernel."""
    from attnopt.planner.timing import time_sites

    spec = next(s for s in attnopt.inspect(*smooth).sites if s.name == "joint").spec
    c = approx_plan.site("joint").choice
    t = time_sites({"joint": spec}, {"joint": c}, "cpu", rounds=2)["joint"]
    assert t.time_s > 0 and t.baseline_time_s > 0 and t.speedup != 1.0 and t.device == "cpu"
