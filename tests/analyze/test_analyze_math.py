"""Attention diagnostics and loss-landscape helpers. CPU, seconds."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import randomized_zero_init

from fdpipe.analyze.attention import (
    attention_distance,
    capture_attention,
    filter_normalized_direction,
    head_cosine_similarity,
    loss_landscape,
    mean_attention_map,
    uniform_grid_mean_distance,
)


def _beit(depth: int = 1, shared: bool = True) -> torch.nn.Module:
    """A tiny FD-style Beit with random bias tables and q/v biases (zero at init, which would hide mistakes)."""
    torch.manual_seed(0)
    model = timm.create_model(
        "beit_base_patch16_224",
        pretrained=False,
        embed_dim=48,
        depth=depth,
        num_heads=3,
        patch_size=8,
        img_size=32,
        use_abs_pos_emb=False,
        use_rel_pos_bias=not shared,
        use_shared_rel_pos_bias=shared,
        init_values=0.1,
        qkv_bias=True,
        num_classes=0,
    )
    return randomized_zero_init(model, 1.0)


def test_identity_attention_has_zero_distance() -> None:
    """Every patch attending only to itself is at distance 0, whatever the prefix tokens do."""
    g, p = 4, 1
    n = p + g * g
    attn = torch.eye(n).expand(2, 3, n, n).clone()
    attn[..., p:, 0] = 0.5  # mass on CLS is excluded, not counted as distance 0 or as a patch
    torch.testing.assert_close(attention_distance(attn, (g, g), p), torch.zeros(3))


def test_uniform_attention_gives_closed_form() -> None:
    """Uniform attention over the patches: the mean pairwise distance of the grid, even with prefix mass mixed in."""
    g, p = 5, 2
    n = p + g * g
    attn = torch.full((2, 4, n, n), 1.0 / n)
    expected = uniform_grid_mean_distance(g)
    torch.testing.assert_close(attention_distance(attn, (g, g), p), torch.full((4,), expected))


def test_uniform_grid_mean_distance_by_hand() -> None:
    """g = 2: 4 self pairs at 0, 8 edge pairs at 1, 4 diagonal pairs at sqrt 2, over 16 ordered pairs."""
    assert uniform_grid_mean_distance(2) == pytest.approx((8 + 4 * math.sqrt(2)) / 16)
    assert uniform_grid_mean_distance(1) == 0.0


def test_distance_uses_row_major_grid() -> None:
    """Attention to the right neighbour is distance 1, to the patch below also 1, on a non-square grid."""
    h, w = 2, 3
    n = h * w
    right = torch.zeros(1, 2, n, n)
    for q in range(n):
        y, x = divmod(q, w)
        right[0, 0, q, y * w + (x + 1) % w] = 1.0  # wraps at the edge: distance 2 there
        right[0, 1, q, ((y + 1) % h) * w + x] = 1.0  # below, wrapping: distance 1 on a 2-row grid
    d = attention_distance(right, (h, w), 0)
    torch.testing.assert_close(d, torch.tensor([(4 * 1 + 2 * 2) / 6, 1.0]))


def test_identical_heads_have_cosine_one_and_disjoint_heads_zero() -> None:
    """Head diversity: equal maps give 1, maps with disjoint support give 0, mean over the pairs i < j."""
    n, p = 5, 1
    a = torch.softmax(torch.randn(2, 1, n, n), -1)
    assert head_cosine_similarity(torch.cat([a, a], 1), p) == pytest.approx(1.0, abs=1e-6)
    eye = torch.eye(n - p)
    flipped = eye.flip(1)  # 4x4 anti-diagonal: no entry on the diagonal
    b = torch.zeros(1, 2, n, n)
    b[0, 0, p:, p:] = eye
    b[0, 1, p:, p:] = flipped
    assert head_cosine_similarity(b, p) == pytest.approx(0.0, abs=1e-6)
    three = torch.cat([a, a, torch.zeros_like(a).index_fill_(-1, torch.tensor([p]), 1.0)], 1)
    c01 = 1.0
    c02 = float(F.cosine_similarity(a[:, 0, p:, p:].reshape(2, -1), three[:, 2, p:, p:].reshape(2, -1)).mean())
    assert head_cosine_similarity(three, p) == pytest.approx((c01 + 2 * c02) / 3, abs=1e-6)


def test_mean_attention_map_rows_sum_to_one() -> None:
    """The mean map is over patch keys only, renormalised, with shape [Np, Np]."""
    attn = torch.softmax(torch.randn(2, 3, 17, 17), -1)
    m = mean_attention_map(attn, 1)
    assert m.shape == (16, 16)
    torch.testing.assert_close(m.sum(-1), torch.ones(16))


def test_captured_attention_equals_manual_recomputation() -> None:
    """softmax(q k^T * scale + shared rel-pos bias) from the block's own weights, q_bias, v_bias and bias table."""
    model = _beit(depth=1, shared=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    (captured,) = capture_attention(model, x)

    blk = model.blocks[0]
    attn = blk.attn
    with torch.no_grad():
        tokens = model.patch_embed(x)
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), tokens], 1)
        h = blk.norm1(tokens)
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        qkv = h @ attn.qkv.weight.T + bias
        b, n, _ = qkv.shape
        heads = attn.num_heads
        q, k, _ = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        scale = q.shape[-1] ** -0.5
        table = model.rel_pos_bias.relative_position_bias_table
        index = model.rel_pos_bias.relative_position_index
        rel = table[index.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1)
        manual = torch.softmax(q @ k.transpose(-2, -1) * scale + rel, dim=-1)
    assert captured.shape == (2, 3, 17, 17)
    torch.testing.assert_close(captured, manual, rtol=1e-5, atol=1e-6)
    # the bias matters: without it the maps differ
    assert not torch.allclose(captured, torch.softmax(q @ k.transpose(-2, -1) * scale, -1), atol=1e-3)


@pytest.mark.parametrize("fused", [True, False])
def test_fused_attn_and_mode_restored_after_capture(fused: bool) -> None:
    """Capture flips fused_attn off only while it runs, and leaves train mode as it found it."""
    model = _beit(depth=2, shared=False).train()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    maps = capture_attention(model, torch.randn(1, 3, 32, 32))
    assert len(maps) == 2
    assert all(blk.attn.fused_attn is fused for blk in model.blocks)
    assert model.training and all(m.training for m in model.modules())


def test_capture_works_on_vit() -> None:
    """timm VisionTransformer attention is captured too; rows are distributions over N = 1 + patches."""
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=0
    )
    maps = capture_attention(vit, torch.randn(2, 3, 32, 32))
    assert len(maps) == 2 and maps[0].shape == (2, 3, 17, 17)
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(2, 3, 17))


def test_filter_normalized_direction_matches_filter_norms() -> None:
    """Each filter (row) of d has the norm of the same filter of the weight; 1-D params get zeros."""
    model = _beit(depth=1)
    d = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    w = model.blocks[0].attn.qkv.weight
    torch.testing.assert_close(d["blocks.0.attn.qkv.weight"].norm(dim=1), w.norm(dim=1))
    assert torch.count_nonzero(d["blocks.0.norm1.weight"]) == 0


def test_loss_landscape_restores_parameters_exactly() -> None:
    """After the sweep every parameter is bit-identical, and alpha = 0 gives the centre loss."""
    model = _beit(depth=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 32, 32)

    def loss_fn(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return m(batch).pow(2).mean()

    gen = torch.Generator().manual_seed(0)
    out = loss_landscape(model, loss_fn, x, alphas=[-0.5, 0.0, 0.5], n_dirs=2, generator=gen)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert len(out["losses"]) == 2 and len(out["mean"]) == 3
    assert out["losses"][0][1] == pytest.approx(out["center"], rel=1e-6)
    assert out["losses"][0][0] != pytest.approx(out["center"])
