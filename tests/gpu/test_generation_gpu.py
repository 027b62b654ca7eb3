"""harc's decoder on CUDA: graph-captured decode steps against transformers' generate on the unit
tests' check set (float32: identical tokens, with the Triton decode attention and RMSNorm and
without), and bf16 through graphs without an eager fallback."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from test_generation import PROMPTS, TEMPLATE, compacting_stops, run_both, sharp  # noqa: E402
from tiny import tiny_model, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch,template", [("llama", "llama3.1"), ("qwen2", "qwen2.5")])
def test_graph_steps_match_reference_in_float32(arch, template):
    tok, model = tiny_tokenizer(template), sharp(tiny_model(arch)).cuda()
    prompts = PROMPTS + [TEMPLATE.format(p) for p in PROMPTS[:5]]
    # window 8 and buckets down to 1 row: refills, compaction and many captured shapes
    _, _, stats = compacting_stops(model, tok, prompts, 8,
                                   engine=dict(graphs=True, window=8, min_rows=1))
    assert stats["graphs"] > 1 and stats["eager_fallback"] is None
    assert stats["steps"] > stats["graphs"]


def test_default_cuda_path_uses_graphs_in_bf16():
    tok = tiny_tokenizer("qwen2.5")
    model = sharp(tiny_model("qwen2", hidden=64)).to("cuda", torch.bfloat16)
    ref, new, stats = run_both(model, tok, PROMPTS, batch_size=4, max_new=24)
    assert stats["graphs"] > 0 and stats["eager_fallback"] is None
    assert all(new) and sum(a != b for a, b in zip(ref, new)) <= len(ref) // 2
    # head_dim 16: the Triton decode attention and RMSNorm are the CUDA defaults
    assert stats["decode_attn"] == "triton" and stats["fused_norms"] == 2 * 4 + 1
    assert stats["fused_residuals"] == 4 and stats["fused_rotary"] == 1


@pytest.mark.parametrize("attn", ["triton", "sdpa"])
def test_triton_kernels_in_graphs_match_reference_in_float32(monkeypatch, attn):
    monkeypatch.setenv("HARC_DECODE_ATTN", attn)
    tok, model = tiny_tokenizer("llama3.1"), sharp(tiny_model("llama", hidden=64)).cuda()
    prompts = PROMPTS + [TEMPLATE.format(p) for p in PROMPTS[:5]]
    _, _, stats = compacting_stops(model, tok, prompts, 8,
                                   engine=dict(graphs=True, window=8, min_rows=1))
    assert stats["graphs"] > 1 and stats["eager_fallback"] is None
    assert stats["decode_attn"] == attn and stats["fused_norms"] == 2 * 4 + 1
    assert stats["fused_residuals"] == 4
