"""BlockLayout: validation, set operations, density, element mask, kernel form, picture."""

from dataclasses import dataclass

import pytest
import torch

import sparta.kernels as K
from sparta.attention import BlockLayout, HeadGroup, invert_permutation


def random_layout(heads=3, seqlen=50, block=16, batch=1, seed=0, density=0.4) -> BlockLayout:
    generator = torch.Generator().manual_seed(seed)
    blocks = -(-seqlen // block)
    mask = torch.rand(batch, heads, blocks, blocks, generator=generator) < density
    return BlockLayout(mask, seqlen, seqlen, block, block)


@dataclass(frozen=True)
class ReversedOrder:
    """A TokenOrder for tests: the kernel sees the tokens back to front."""

    length: int

    def permutation(self, device=None):
        return torch.arange(self.length - 1, -1, -1, device=device)


def test_element_mask_is_the_block_mask_expanded_to_tokens():
    layout = random_layout(seqlen=50, block=16)  # last block short: 50 = 3 * 16 + 2
    elements = layout.element_mask()
    assert elements.shape == (1, 3, 50, 50)
    for h in range(3):
        for i in range(50):
            for j in range(50):
                assert elements[0, h, i, j] == layout.mask[0, h, i // 16, j // 16]


def test_element_mask_maps_a_token_order_back_to_model_order():
    base = random_layout(heads=2, seqlen=40, block=16, seed=1)
    order = ReversedOrder(40)
    layout = BlockLayout(base.mask, 40, 40, 16, 16, order)
    elements = layout.element_mask()
    for h in range(2):
        for i in range(40):
            for j in range(40):  # model token t sits at kernel position 39 - t
                assert elements[0, h, i, j] == base.mask[0, h, (39 - i) // 16, (39 - j) // 16]


def test_union_intersection_and_density():
    a, b = random_layout(seed=2), random_layout(seed=3)
    assert torch.equal(a.union(b).mask, a.mask | b.mask)
    assert torch.equal(a.intersection(b).mask, a.mask & b.mask)
    expected = [a.mask[0, h].sum().item() / a.mask[0, h].numel() for h in range(3)]
    assert a.density().tolist() == pytest.approx(expected)
    assert BlockLayout.full(2, 33, block_q=16, block_k=16).density().tolist() == [1.0, 1.0]


def test_repeat_and_concat_heads():
    one = random_layout(heads=1, seed=4)
    four = one.repeat_heads(4)
    assert four.heads == 4 and all(torch.equal(four.mask[0, h], one.mask[0, 0]) for h in range(4))
    both = BlockLayout.concat_heads([one, random_layout(heads=2, seed=5)])
    assert both.heads == 3 and torch.equal(both.mask[0, 0], one.mask[0, 0])


def test_kernel_form_round_trips_to_the_same_block_mask():
    layout = random_layout(heads=3, seqlen=70, block=16, batch=2, seed=6)
    kernel = layout.to_kernel()
    assert kernel is layout.to_kernel()  # built once
    assert torch.equal(K.layout_block_mask(kernel), layout.mask)
    # The transposed lists hold the same pairs.
    for b in range(2):
        for h in range(3):
            for j in range(layout.mask.shape[3]):
                listed = set(kernel.q_index[b, h, j, :kernel.q_count[b, h, j]].tolist())
                assert listed == set(torch.nonzero(layout.mask[b, h, :, j]).flatten().tolist())


def test_invert_permutation_round_trips():
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 37, 5)
    inverse = invert_permutation(perm)
    assert torch.equal(x[:, perm][:, inverse], x)
    assert torch.equal(perm[inverse], torch.arange(37))


def test_save_png_writes_a_picture(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "layout.png"
    random_layout(heads=3).save_png(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kwargs, argument", [
    (dict(mask=torch.ones(1, 2, 4, 4, dtype=torch.int8)), "mask"),
    (dict(mask=torch.ones(2, 4, 4, dtype=torch.bool)), "mask"),
    (dict(mask=torch.ones(1, 2, 3, 4, dtype=torch.bool)), "mask"),
    (dict(block_q=0), "block_q"),
    (dict(seqlen_k=-5), "seqlen_k"),
])
def test_bad_layout_is_a_value_error_naming_the_argument(kwargs, argument):
    args = dict(mask=torch.ones(1, 2, 4, 4, dtype=torch.bool), seqlen_q=64, seqlen_k=64, block_q=16, block_k=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        BlockLayout(**args)


def test_incompatible_layouts_and_groups_are_value_errors():
    with pytest.raises(ValueError, match="other"):
        random_layout(seqlen=50).union(random_layout(seqlen=60))
    with pytest.raises(ValueError, match="order"):
        BlockLayout(torch.ones(1, 1, 4, 3, dtype=torch.bool), 64, 48, 16, 16, ReversedOrder(64))
    with pytest.raises(ValueError, match="heads"):
        random_layout(heads=2).repeat_heads(3)
    with pytest.raises(ValueError, match="layout"):
        HeadGroup((0, 1), random_layout(heads=3))
    with pytest.raises(ValueError, match="heads"):
        HeadGroup((0, 0), None)
