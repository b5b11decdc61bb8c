"""attend() and SparseAttention: dense equivalence, gradients, head groups and token orders,
rotary embeddings, providers."""

import pytest
import torch
import torch.nn.functional as F

import sparta.kernels as K
from sparta.attention import (
    BlockLayout,
    DynamicBlockSelection,
    HeadGroup,
    Pattern,
    SparseAttention,
    SparseDSchedule,
    TileOrder,
    VideoGrid,
    attend,
    masked_attention,
)
from sparta.attention.module import apply_rotary, rotary_angles_1d, rotary_angles_3d


def qkv(heads=4, kv_heads=None, tokens=48, dim=16, batch=2, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    return (torch.randn(batch, heads, tokens, dim, generator=generator, dtype=dtype),
            torch.randn(batch, kv_heads, tokens, dim, generator=generator, dtype=dtype),
            torch.randn(batch, kv_heads, tokens, dim, generator=generator, dtype=dtype))


def reference_per_head(q, k, v, head_masks):
    """Each query head on its own: explicit softmax over its allowed keys (zero if none)."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for h, mask in head_masks.items():
        logits = q[:, h] @ k[:, h // group].transpose(-1, -2) / q.shape[-1] ** 0.5
        for b in range(q.shape[0]):
            for i in range(q.shape[2]):
                allowed = mask[i]
                if allowed.any():
                    weights = logits[b, i, allowed].softmax(-1)
                    out[b, h, i] = weights @ v[b, h // group, allowed]
    return out


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_full_layout_equals_dense_sdpa_forward_and_backward(kv_heads):
    q, k, v = (t.requires_grad_() for t in qkv(kv_heads=kv_heads, tokens=40))
    layout = BlockLayout.full(4, 40, block_q=16, block_k=16)
    out = attend(q, k, v, [HeadGroup((0, 1, 2, 3), layout)], backend="reference")
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=kv_heads != 4)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for g, w in zip(got, want):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_masked_attention_matches_an_explicit_softmax_with_empty_rows_zero():
    q, k, v = qkv(heads=2, tokens=20, batch=1)
    mask = torch.rand(1, 2, 20, 20, generator=torch.Generator().manual_seed(1)) < 0.3
    mask[0, 1, 5] = False  # a query with no key
    out = masked_attention(q, k, v, mask)
    torch.testing.assert_close(out, reference_per_head(q, k, v, {0: mask[0, 0], 1: mask[0, 1]}))
    assert (out[0, 1, 5] == 0).all()


def test_sparse_gradients_flow_to_q_k_v_and_match_the_explicit_reference():
    q, k, v = (t.requires_grad_() for t in qkv(heads=2, tokens=32, batch=1))
    layout = BlockLayout(torch.tensor([[[[True, False], [True, True]], [[False, True], [False, False]]]]), 32, 32, 16, 16)
    out = attend(q, k, v, [HeadGroup((0, 1), layout)], backend="reference")
    masks = layout.element_mask()[0]
    expected = reference_per_head(q, k, v, {0: masks[0], 1: masks[1]})
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for g, w in zip(got, want):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.fixture
def kernel_stand_in(monkeypatch):
    """The contract's pure-torch reference stands in for the Triton kernel: exercises the glue
    (head gather, token reorder, kernel layout, scatter) without the interpreter."""
    monkeypatch.setattr(K, "block_sparse_attention", K.block_sparse_attention_reference)


def test_head_groups_with_token_orders_gqa_dense_and_skipped_heads(kernel_stand_in):
    grid = VideoGrid(2, 4, 8)  # 64 tokens
    q, k, v = qkv(heads=6, kv_heads=3, tokens=grid.tokens)
    tiles = Pattern.of("tiles", tile=(1, 2, 8), window=(1, 3, 1)).build(grid, block=16)
    diagonal = Pattern.of("diagonal", width=5).build(grid, block=16)
    stripe = Pattern.of("stripe", keys=((0, 16),)).build(grid, block=16)
    groups = [HeadGroup((4, 1), BlockLayout.concat_heads([tiles, tiles])),
              HeadGroup((0, 5), BlockLayout.concat_heads([diagonal, stripe])),
              HeadGroup((3,), None)]  # head 2 is skipped
    expected = reference_per_head(q, k, v, {4: tiles.element_mask()[0, 0], 1: tiles.element_mask()[0, 0],
                                            0: diagonal.element_mask()[0, 0], 5: stripe.element_mask()[0, 0],
                                            3: torch.ones(64, 64, dtype=torch.bool)})
    for backend in ("triton", "reference"):
        out = attend(q, k, v, groups, backend=backend)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out[:, 2] == 0).all()
    assert (attend(q, k, v, [], backend="triton") == 0).all()  # every head skipped


@pytest.mark.parametrize("pattern", [Pattern.of("tiles", tile=(1, 2, 8), window=(1, 3, 1)),
                                     Pattern.of("tiles", tile=(1, 2, 8), window=(2, 1, 1)), Pattern.of("full")])
def test_attention_on_tokens_in_a_token_order_is_raster_attention_reordered(kernel_stand_in, pattern):
    """token_order: 3-D rotary and the layout follow each token's raster position (patterns whose token
    pairs are the same in both orders: the model's own tiles, run permuted on raster tokens)."""
    grid = VideoGrid(2, 8, 8, text=3)
    order = TileOrder(grid, (1, 2, 8))
    raster = SparseAttention(32, 2, rotary="3d", grid=grid, layout=pattern.build(grid, block=16).repeat_heads(2))
    ordered = SparseAttention(32, 2, rotary="3d", grid=grid, token_order=order,
                              layout=pattern.build(grid, block=16, token_order=order).repeat_heads(2))
    ordered.load_state_dict(raster.state_dict())
    x, perm = torch.randn(2, grid.tokens, 32), order.permutation()
    for backend in ("triton", "reference"):
        raster.core.backend = ordered.core.backend = backend
        torch.testing.assert_close(ordered(x[:, perm]), raster(x)[:, perm], atol=1e-5, rtol=1e-5)


def test_a_later_group_replaces_its_heads(kernel_stand_in):
    q, k, v = qkv(heads=4, kv_heads=2, tokens=32)
    band = BlockLayout(torch.eye(2, dtype=torch.bool)[None, None].repeat(1, 4, 1, 1), 32, 32, 16, 16)
    everything = BlockLayout.full(2, 32, block_q=16, block_k=16)
    out = attend(q, k, v, [HeadGroup((0, 1, 2, 3), band), HeadGroup((3, 0), everything)])
    expected = reference_per_head(q, k, v, {h: (band if h in (1, 2) else everything).element_mask()[0, 0]
                                            for h in range(4)})
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_rotary_1d_scores_depend_only_on_the_offset():
    q, k = torch.randn(1, 1, 1, 16).expand(1, 1, 40, 16), torch.randn(1, 1, 1, 16).expand(1, 1, 40, 16)
    angles = rotary_angles_1d(40, 16)
    scores = apply_rotary(q, angles.cos(), angles.sin())[0, 0] @ apply_rotary(k, angles.cos(), angles.sin())[0, 0].T
    for offset in (-7, 0, 3, 12):
        diagonal = torch.diagonal(scores, offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(apply_rotary(q, angles.cos(), angles.sin())[0, 0, 0], q[0, 0, 0])  # position 0: no rotation
    assert not torch.allclose(scores[0, 1], scores[0, 2])  # the offset does matter


def test_rotary_3d_is_relative_in_each_axis_and_leaves_text_alone():
    grid = VideoGrid(3, 4, 5, text=2)
    q, k = torch.randn(1, 1, 1, 32).expand(1, 1, grid.tokens, 32), torch.randn(1, 1, 1, 32).expand(1, 1, grid.tokens, 32)
    angles = rotary_angles_3d(grid, 32)
    rq, rk = apply_rotary(q, angles.cos(), angles.sin())[0, 0], apply_rotary(k, angles.cos(), angles.sin())[0, 0]
    torch.testing.assert_close(rq[:2], q[0, 0, :2])  # text tokens untouched

    def token(f, h, w):
        return grid.text + (f * grid.height + h) * grid.width + w

    for shift in [(1, 0, 0), (0, 2, 0), (0, 0, 3), (1, 1, 1)]:
        a, b = token(0, 1, 0), token(1, 0, 1)
        a2 = token(*(c + s for c, s in zip((0, 1, 0), shift)))
        b2 = token(*(c + s for c, s in zip((1, 0, 1), shift)))
        torch.testing.assert_close(rq[a] @ rk[b], rq[a2] @ rk[b2], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(rq[token(0, 0, 0)] @ rk[token(0, 0, 1)], rq[token(0, 0, 0)] @ rk[token(0, 1, 0)])


def test_rotary_1d_tables_are_made_once_and_left_out_of_checkpoints():
    """Made in the forward, a compiled model would recompute cos/sin inside every rotation kernel."""
    module = SparseAttention(32, 2, rotary="1d", max_tokens=24, backend="dense")
    angles = rotary_angles_1d(24, 16)
    assert torch.equal(module.rotary_cos, angles.cos()) and torch.equal(module.rotary_sin, angles.sin())
    assert not any("rotary" in key for key in module.state_dict())


@pytest.mark.parametrize("rotary, kv_heads", [(None, 4), ("1d", 2), ("3d", 1)])
def test_module_with_a_full_layout_equals_the_dense_backend(rotary, kv_heads):
    grid = VideoGrid(2, 3, 4, text=3)  # 27 tokens
    torch.manual_seed(0)
    shape = dict(num_kv_heads=kv_heads, rotary=rotary, grid=grid, max_tokens=grid.tokens + 5)  # 1d: tables sliced
    sparse = SparseAttention(64, 4, **shape, layout=BlockLayout.full(4, grid.tokens, block_q=16, block_k=16),
                             backend="reference")
    dense = SparseAttention(64, 4, **shape, backend="dense")
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(2, grid.tokens, 64)
    out = sparse(x)
    torch.testing.assert_close(out, dense(x), atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    assert sparse.qkv.weight.grad.abs().sum() > 0 and sparse.out.weight.grad.abs().sum() > 0


def test_module_runs_each_provider():
    torch.manual_seed(0)
    x = torch.randn(1, 64, 32)
    reference = SparseAttention(32, 2, backend="dense")
    dense = reference(x)
    selected = SparseAttention(32, 2, layout=DynamicBlockSelection(topk=4, block=16), backend="reference")
    schedule = SparseDSchedule(4, skip_ratio=0.5, keep_ratio=1.0, block=16)
    scheduled = SparseAttention(32, 2, layout=schedule, backend="reference", layer=3)
    for module in (selected, scheduled):
        module.load_state_dict(reference.state_dict())
    torch.testing.assert_close(selected(x), dense, atol=1e-5, rtol=1e-5)  # top-4 of 4 blocks = all
    for step in range(4):
        schedule.step = step
        torch.testing.assert_close(scheduled(x), dense, atol=1e-5, rtol=1e-5)  # keep_ratio 1 = all
    assert schedule(x[None], x[None], 3)[0].layout.mask.all()  # layer 3's mask was computed and cached


@pytest.mark.parametrize("call, argument", [
    (lambda: SparseAttention(30, 4), "num_heads"),
    (lambda: SparseAttention(32, 4, num_kv_heads=3), "num_kv_heads"),
    (lambda: SparseAttention(32, 4, rotary="2d"), "rotary"),
    (lambda: SparseAttention(32, 4, rotary="3d"), "grid"),
    (lambda: SparseAttention(32, 4, rotary="1d"), "max_tokens"),
    (lambda: SparseAttention(32, 4, rotary="1d", max_tokens=8)(torch.randn(1, 9, 32)), "x: 9 tokens, more than max_tokens=8"),
    (lambda: SparseAttention(32, 4, backend="flash"), "backend"),
    (lambda: SparseAttention(32, 4, layout="diagonal"), "layout"),
    (lambda: SparseAttention(32, 4)(torch.randn(4, 32)), "x"),
    (lambda: attend(*qkv(heads=3, kv_heads=2), None), "k"),
    (lambda: attend(*qkv(), [HeadGroup((0, 7), None)], backend="reference"), "groups"),
    (lambda: attend(*qkv(), [HeadGroup((0, 1, 2, 3), BlockLayout.full(4, 64, block_q=16, block_k=16))],
                    backend="reference"), "layout"),
])
def test_bad_module_input_is_a_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests cover the compiled kernel")
def test_module_on_the_triton_kernel_in_the_interpreter():
    """The real kernel (Triton interpreter, fp32), a tile-reordered plan group and a plain group."""
    grid = VideoGrid(2, 4, 8)  # 64 tokens, blocks of 32
    tiles = Pattern.of("tiles", tile=(1, 4, 8), window=(1, 1, 1)).build(grid, block=32)
    diagonal = Pattern.of("diagonal", width=3).build(grid, block=32)
    groups = [HeadGroup((1,), tiles), HeadGroup((0,), diagonal)]
    torch.manual_seed(0)
    module = SparseAttention(64, 2, layout=lambda q, k, layer: groups, backend="triton")
    reference = SparseAttention(64, 2, layout=lambda q, k, layer: groups, backend="reference")
    reference.load_state_dict(module.state_dict())
    x = torch.randn(1, grid.tokens, 64)
    out, expected = module(x), reference(x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(module.qkv.weight.grad, reference.qkv.weight.grad, atol=1e-3, rtol=1e-3)
