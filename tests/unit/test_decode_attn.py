"""The Triton decode attention against SDPA with an explicit mask: batch sizes, row lengths
(clamped to the width), head groupings, split counts, float32 and bf16, views of a larger cache and
a non-contiguous query, as the engine passes them. On CUDA the compiled kernels run; without a GPU
they run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before Triton is
imported)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from triton_kernels import forget_failures, kernel_device

from harc import _decode_attn as da
from harc.errors import HarcError

pytestmark = pytest.mark.unit
DEV = kernel_device()


@pytest.fixture(autouse=True)
def no_failure_remembered(monkeypatch):
    forget_failures(monkeypatch, da, "HARC_DECODE_ATTN")
    monkeypatch.delenv("HARC_DECODE_STORE", raising=False)
    monkeypatch.setattr(da, "_store_broken", [])


def inputs(b, hq, hkv, d, width, dtype, seed=0, length=None):
    """A query laid out as transformers passes it ([B, Hq, 1, D] view of [B, 1, Hq, D]) and K/V
    as the slot cache passes them: the first `width` columns of the first B slots of a longer
    cache with one extra slot, whose other columns hold NaN (read one and the output shows it)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 1, hq, d, generator=g).to(dtype).transpose(1, 2)
    length = length or width + 64
    cache = torch.full((2, b + 1, hkv, length, d), float("nan"), dtype=dtype)
    cache[:, :b, :, :width] = torch.randn(2, b, hkv, width, d, generator=g).to(dtype)
    q, cache = q.to(DEV), cache.to(DEV)
    return q, cache[0, :b, :, :width], cache[1, :b, :, :width], cache


def lengths(*n):
    return torch.tensor(n, device=DEV)


def reference(q, k, v, lens, scale=None):
    """SDPA in float32 with the explicit additive mask over each row's columns < lens, every
    query head against its own copy of its KV head (transformers' repeat_kv), on CPU."""
    q, k, v, lens = q.cpu(), k.cpu(), v.cpu(), lens.cpu()
    b, hq, _, d = q.shape
    hkv, width = k.shape[1], k.shape[2]
    visible = torch.arange(width)[None, :] < lens[:, None]
    mask = torch.zeros(b, 1, 1, width).masked_fill_(~visible[:, None, None], torch.finfo(torch.float32).min)
    k, v = (x.float().nan_to_num(0.0).repeat_interleave(hq // hkv, 1) for x in (k, v))
    out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)  # [B, 1, Hq, D]


CASES = [  # rows, query heads, KV heads, head dim, width, splits (None: the default)
    (1, 4, 2, 16, 64, None),
    (3, 4, 2, 16, 64, 1),
    (5, 28, 4, 64, 192, 3),  # Qwen2.5-7B's grouping (7 query heads per KV head)
    (4, 32, 8, 32, 128, 2),  # Llama-3.1-8B's grouping (4)
    (2, 8, 8, 32, 130, None),  # no grouping, a width off the block size
    (6, 16, 1, 16, 100, 16),  # one KV head; more splits than most rows have blocks
    (2, 64, 1, 16, 70, 4),  # 64 query heads on one KV head
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,hq,hkv,d,width,splits", CASES)
def test_matches_masked_sdpa_reading_only_each_rows_columns(b, hq, hkv, d, width, splits, dtype):
    q, k, v, _ = inputs(b, hq, hkv, d, width, dtype, seed=b + width)
    g = torch.Generator().manual_seed(width)
    lens = torch.randint(1, width + 1, (b,), generator=g).to(DEV)
    lens[0] = width  # a full row ...
    if b > 1:
        lens[1] = 1  # ... and a row of one column
    # NaN after each row's last column: a kernel that reads past a row's length returns NaN
    for r in range(b):
        k[r, :, lens[r]:] = float("nan")
        v[r, :, lens[r]:] = float("nan")
    out = da.attend(q, k, v, lens, None, splits=splits)
    assert out is not None and out.shape == (b, 1, hq, d) and out.dtype == dtype
    assert torch.isfinite(out).all()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float().cpu(), reference(q, k, v, lens), **tol)


def test_bf16_error_is_that_of_sdpa_in_bf16():
    # Both round the output (and the kernel its probabilities) to bf16: the kernel may not be
    # much further from the float32 result than SDPA run on the bf16 inputs.
    q, k, v, _ = inputs(8, 28, 4, 64, 320, torch.bfloat16)
    lens = lengths(320, 17, 64, 65, 200, 300, 1, 128)
    exact = reference(q, k, v, lens)
    ours = (da.attend(q, k, v, lens, None).float().cpu() - exact).abs().max()
    visible = torch.arange(320, device=DEV)[None, :] < lens[:, None]
    mask = torch.zeros(8, 1, 1, 320, dtype=torch.bfloat16, device=DEV).masked_fill_(
        ~visible[:, None, None], torch.finfo(torch.bfloat16).min)
    sdpa = F.scaled_dot_product_attention(q.reshape(8, 4, 7, 64), k, v, attn_mask=mask)
    theirs = (sdpa.reshape(8, 1, 28, 64).float().cpu() - exact).abs().max()
    assert ours <= 2 * theirs + 1e-3


def test_lengths_past_the_width_are_clamped_and_scale_is_applied():
    q, k, v, cache = inputs(3, 4, 2, 16, 64, torch.float32)
    lens = lengths(64, 500, 65)  # the engine's finished rows may sit past the bucket
    out = da.attend(q, k, v, lens, 0.3, splits=2)
    assert torch.isfinite(out).all()  # columns >= 64 of the cache hold NaN
    torch.testing.assert_close(out.cpu(), reference(q, k, v, lengths(64, 64, 64), 0.3))
    assert not torch.allclose(out, da.attend(q, k, v, lens, None, splits=2))


def test_every_split_count_gives_the_same_result():
    q, k, v, _ = inputs(4, 8, 2, 32, 256, torch.float32)
    lens = lengths(256, 130, 64, 3)
    outs = [da.attend(q, k, v, lens, None, splits=s) for s in (1, 2, 5, 16)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-6, rtol=1e-5)


def test_default_splits_split_only_what_cannot_fill_the_machine(monkeypatch):
    monkeypatch.setattr(da, "_sm_count", lambda device: 132)  # H200
    cpu = torch.device("cpu")
    # the shapes measured on an H200, where one split was the fastest
    for rows, kv_heads in ((256, 8), (256, 4), (64, 8), (64, 4)):
        assert da.default_splits(rows, kv_heads, 768, cpu) == 1
    assert da.default_splits(8, 4, 8192, cpu) == 5  # 32 programs: about one per SM
    assert da.default_splits(1, 1, 8192, cpu) == da.MAX_SPLITS
    assert da.default_splits(8, 4, 768, cpu) == 3  # at least 256 columns per split
    assert da.default_splits(1, 1, 200, cpu) == 1


@pytest.mark.parametrize("change", ["two tokens", "head dim 8", "head dim 80", "dtypes differ",
                                    "groups of 65", "strided head dim", "float lengths",
                                    "lengths of 3 rows"])
def test_inputs_it_does_not_handle_get_none(change):
    q, k, v, _ = inputs(2, 4, 2, 16, 64, torch.float32)
    lens = lengths(3, 5)
    if change == "two tokens":
        q = torch.cat([q, q], 2)
    elif change.startswith("head dim"):
        d = int(change.split()[-1])
        q, k, v, _ = inputs(2, 4, 2, d, 64, torch.float32)
    elif change == "dtypes differ":
        q = q.to(torch.bfloat16)
    elif change == "groups of 65":
        q, k, v, _ = inputs(2, 65, 1, 16, 64, torch.float32)
    elif change == "strided head dim":
        k = torch.randn(2, 2, 64, 32, device=DEV)[..., ::2]
    elif change == "float lengths":
        lens = lens.float()
    else:
        lens = lengths(3, 5, 7)
    assert da.attend(q, k, v, lens, None) is None


def test_a_failing_kernel_warns_once_and_is_not_tried_again(monkeypatch):
    def broken():
        raise RuntimeError("PTX too new for the driver\nmore")

    monkeypatch.setattr(da, "_kernels", broken)
    monkeypatch.setenv("HARC_DECODE_ATTN", "triton")
    q, k, v, _ = inputs(2, 4, 2, 16, 64, torch.float32)
    with pytest.warns(UserWarning, match="Triton decode attention failed .*PTX too new"):
        assert da.attend(q, k, v, lengths(3, 5), None) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert da.attend(q, k, v, lengths(3, 5), None) is None
        assert not da.enabled(torch.device(DEV))


def test_the_environment_variable_picks_the_path(monkeypatch):
    dev = torch.device(DEV)
    assert da.enabled(dev) == (DEV == "cuda")  # default: the kernel on CUDA only
    monkeypatch.setenv("HARC_DECODE_ATTN", "triton")
    assert da.enabled(dev)
    monkeypatch.setenv("HARC_DECODE_ATTN", "SDPA")
    assert not da.enabled(dev)
    monkeypatch.setenv("HARC_DECODE_ATTN", "flash")
    with pytest.raises(HarcError, match="HARC_DECODE_ATTN must be"):
        da.enabled(dev)
    monkeypatch.setenv("HARC_DECODE_ATTN", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not da.enabled(torch.device("cpu"))  # CPU: under the interpreter only


@pytest.mark.parametrize("hkv, d", [(2, 16), (3, 32), (4, 128)])
def test_store_kv_matches_the_scatter_it_replaces(hkv, d):
    """Rows [:B] of a larger cache, keys as transformers passes them (a [B, Hkv, 1, D] view of
    [B, 1, Hkv, D]), columns from the step's positions ([B, 1]); Hkv=3 exercises the padded head
    block. Every other element of both caches is left as it was."""
    g = torch.Generator().manual_seed(d)
    b, slots, length = 5, 7, 40
    k0, v0 = (torch.randn(slots, hkv, length, d, generator=g).to(DEV) for _ in range(2))
    key, value = (torch.randn(b, 1, hkv, d, generator=g).to(DEV).transpose(1, 2) for _ in range(2))
    cols = torch.tensor([3, 0, 39, 17, 17], device=DEV)[:, None]
    k, v = k0.clone(), v0.clone()
    assert da.store_kv(k, v, key, value, cols)
    idx = cols.view(b, 1, 1, 1).expand(-1, hkv, -1, d)
    k0[:b].scatter_(2, idx, key)
    v0[:b].scatter_(2, idx, value)
    assert torch.equal(k, k0) and torch.equal(v, v0)


def test_store_kv_declines_what_it_cannot_write():
    k = v = torch.zeros(4, 2, 8, 16, device=DEV)
    key = torch.ones(2, 2, 1, 16, device=DEV)
    cols = torch.zeros(2, 1, dtype=torch.long, device=DEV)
    assert not da.store_kv(k, v, key.expand(2, 2, 2, 16), key.expand(2, 2, 2, 16), cols)  # 2 tokens
    assert not da.store_kv(k, v, key.half(), key.half(), cols)  # dtype differs from the cache's
    assert not da.store_kv(k[:, :, :, :12], v[:, :, :, :12], key[..., :12], key[..., :12], cols)
    assert k.abs().sum() == 0


def test_a_failed_store_warns_once_and_leaves_the_attention_kernel_on(monkeypatch):
    def broken():
        raise RuntimeError("no kernel")
    monkeypatch.setattr(da, "_store_kernel", broken)
    k = v = torch.zeros(2, 2, 8, 16, device=DEV)
    key = torch.ones(2, 2, 1, 16, device=DEV)
    cols = torch.zeros(2, 1, dtype=torch.long, device=DEV)
    with pytest.warns(UserWarning, match="KV store failed"):
        assert not da.store_kv(k, v, key, key, cols)
    assert not da.store_kv(k, v, key, key, cols)  # not tried again, no second warning
    assert da._store_broken and not da._broken
