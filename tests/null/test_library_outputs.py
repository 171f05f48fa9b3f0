"""Programs as libraries export them (issue 18): `.pt2` files whose outputs are transformers
dataclasses load in a process that has not imported (cannot import) transformers, and the
optimized file keeps the output type; models returning a KV cache (Whisper's EncoderDecoderCache)
go through the module path; an optimized program keeps the input program's dynamic dimensions."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import attnopt

transformers = pytest.importorskip("transformers")

# The CLI in a fresh process where `import transformers` / `import diffusers` fail.
_BLOCKED_CLI = (
    "import sys, runpy\n"
    "sys.modules['transformers'] = None\n"
    "sys.modules['diffusers'] = None\n"
    "sys.argv = ['attnopt'] + sys.argv[1:]\n"
    "runpy.run_module('attnopt.cli', run_name='__main__')\n")


def run_blocked(*args):
    p = subprocess.run([sys.executable, "-c", _BLOCKED_CLI, *map(str, args)], capture_output=True,
                       text=True, env={**os.environ, "COLUMNS": "200"}, timeout=300)
    return p.returncode, p.stdout, p.stderr


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    return BertModel(cfg).eval(), (torch.randint(0, 50, (2, 8)),)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnopt.frontends.hf_cache import register_cache_pytrees

    register_cache_pytrees()  # the exporting process has transformers: its cache is a pytree node
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval(), (torch.randint(0, 64, (1, 8)),)


@pytest.mark.parametrize("make", [_bert, _llama], ids=["bert", "llama"])
def test_return_dict_pt2_through_cli_without_transformers(make, tmp_path):
    model, args = make()
    with torch.no_grad():
        ep = torch.export.export(model, args, strict=False)
        ref = model(*args)
    out_type = ep.call_spec.out_spec.type
    assert out_type.__module__.startswith("transformers.")  # a library dataclass, return_dict=True
    src, dst = tmp_path / "model.pt2", tmp_path / "opt.pt2"
    torch.export.save(ep, src)

    rc, out, err = run_blocked("inspect", src, "--json")
    assert rc == 0, err
    assert json.loads(out)["sites"], out
    assert "Traceback" not in err
    rc, out, err = run_blocked("optimize", src, "-o", dst)
    assert rc == 0, err
    assert "rewritten" in out

    # the optimized file loads back where transformers is imported, with the same output type
    back = torch.export.load(dst)
    assert back.call_spec.out_spec.type is out_type
    with torch.no_grad():
        got = back.module()(*args)
    assert type(got) is out_type
    first = next(iter(ref.values()))
    torch.testing.assert_close(next(iter(got.values())), first, rtol=1e-4, atol=1e-5)


def test_placeholder_stands_in_for_the_output_type(tmp_path):
    """In process, with the type's name unregistered, the loader's placeholder holds the fields."""
    from attnopt.frontends.pt2 import load_program_bytes, program_bytes

    model, args = _bert()
    with torch.no_grad():
        ep = torch.export.export(model, args, strict=False)
    data = program_bytes(ep)
    renamed = _rename_out_type(data, "transformers.modeling_outputs.BaseModelOutputWithPooling"
                               "AndCrossAttentions", "notalibrary.outputs.SomeOutput")
    loaded = load_program_bytes(renamed, "renamed.pt2")
    with torch.no_grad():
        got = loaded.module()(*args)
    assert set(got) == {"last_hidden_state", "pooler_output"}
    # written back, the treespec is the original one
    again = zipfile.ZipFile(io.BytesIO(program_bytes(loaded)))
    text = b"".join(again.read(n) for n in again.namelist() if "/models/" in n and n.endswith(".json"))
    assert b"notalibrary.outputs.SomeOutput" in text


def test_unresolvable_type_is_one_line_exit_4(tmp_path):
    model, args = _bert()
    with torch.no_grad():
        ep = torch.export.export(model, args, strict=False)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(_rename_out_type(buf.getvalue(), "transformers.modeling_outputs.BaseModelOutput"
                                     "WithPoolingAndCrossAttentions", "not a type name"))
    rc, out, err = run_blocked("inspect", bad)
    assert rc == 4, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    assert "not a type name" in err


def _rename_out_type(data: bytes, old: str, new: str) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            blob = src.read(info)
            if "/models/" in info.filename and info.filename.endswith(".json"):
                blob = blob.replace(old.encode(), new.encode())
            dst.writestr(info, blob)
    return out.getvalue()


def _whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=8,
                        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1)
    model = WhisperForConditionalGeneration(cfg).eval()
    inputs = {"input_features": torch.randn(1, 8, 16), "decoder_input_ids": torch.tensor([[1, 5, 6, 7]])}
    return model, inputs


def test_whisper_default_cache_module_path():
    model, inputs = _whisper()
    with torch.no_grad():
        ref = model(**inputs)
    assert type(ref.past_key_values).__name__ == "EncoderDecoderCache"  # the default use_cache=True
    report = attnopt.inspect(model, inputs)
    assert len(report.sites) == 3
    res = attnopt.optimize(model, inputs)
    assert [s.status for s in res.sites] == ["rewritten"] * 3
    with torch.no_grad():
        got = res.model(**inputs)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-5)
    assert type(got.past_key_values).__name__ == "EncoderDecoderCache"
    plan = attnopt.plan(model, inputs)
    assert plan is not None


class _DynAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.o = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 16).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v
        return self.o(a.transpose(1, 2).reshape(b, s, 32))


def test_dynamic_shapes_survive_optimize(tmp_path):
    from torch.export import Dim

    torch.manual_seed(0)
    model = _DynAttention().eval()
    ep = torch.export.export(model, (torch.randn(2, 8, 32),),
                             dynamic_shapes={"x": {0: Dim("batch", max=64), 1: Dim("seq", min=2, max=128)}})
    src = tmp_path / "dyn.pt2"
    torch.export.save(ep, src)
    res = attnopt.optimize(str(src))
    assert [s.status for s in res.sites] == ["rewritten"]
    assert res.model.range_constraints
    assert sorted((int(r.lower), int(r.upper)) for r in res.model.range_constraints.values()) == \
        sorted((int(r.lower), int(r.upper)) for r in ep.range_constraints.values())
    for b, s in [(1, 5), (3, 16), (4, 33)]:
        x = torch.randn(b, s, 32)
        with torch.no_grad():
            torch.testing.assert_close(res.model.module()(x), ep.module()(x), rtol=1e-4, atol=1e-5)


def test_static_and_sliding_caches_module_path():
    """A StaticCache passed in (and returned), and a sliding-window model's default cache."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, StaticCache

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 8))

    def inputs():
        return {"input_ids": ids, "past_key_values": StaticCache(config=cfg, max_cache_len=16),
                "cache_position": torch.arange(8)}

    with torch.no_grad():
        ref = model(**inputs())
    assert len(attnopt.inspect(model, inputs()).sites) == 1
    res = attnopt.optimize(model, inputs())
    assert [s.status for s in res.sites] == ["rewritten"]
    with torch.no_grad():
        got = res.model(**inputs())
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-5)
    assert type(got.past_key_values) is StaticCache

    mcfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, sliding_window=4,
                         max_position_embeddings=32)
    res = attnopt.optimize(MistralForCausalLM(mcfg).eval(), (ids,))
    assert [s.status for s in res.sites] == ["rewritten", "rewritten"]


def test_dynamic_return_dict_pt2_through_cli(tmp_path):
    """Both at once: a BERT exported with dynamic batch/sequence and return_dict=True, optimized by
    the CLI without transformers, runs at other sizes with the original output type."""
    from torch.export import Dim
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    model = BertModel(cfg).eval()
    ep = torch.export.export(model, (torch.randint(0, 50, (2, 8)),), strict=False,
                             dynamic_shapes={"input_ids": {0: Dim("b", max=32), 1: Dim("s", min=2, max=64)}})
    src, dst = tmp_path / "dyn.pt2", tmp_path / "dyn_opt.pt2"
    torch.export.save(ep, src)
    rc, out, err = run_blocked("optimize", src, "-o", dst)
    assert rc == 0, err
    back = torch.export.load(dst)
    assert len(back.range_constraints) == 2
    for b, s in [(1, 5), (3, 16), (4, 33)]:
        x = torch.randint(0, 50, (b, s))
        with torch.no_grad():
            got, ref = back.module()(x), ep.module()(x)
        assert type(got) is type(ref)
        torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, rtol=1e-4, atol=1e-5)
