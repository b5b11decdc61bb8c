"""SparseD for diffusion language models: dense early, then one cached sparse mask per layer.

A diffusion LM denoises the whole sequence T times with bidirectional attention. SparseD's
observations: the early steps need full attention (the pattern is not settled yet), and afterwards
each head's block pattern barely changes between steps. So:

- steps 0 .. ceil(skip_ratio * T) - 1 run dense;
- at the switch step each layer computes, from that step's exact attention, one top-k block mask per
  head: every query block keeps ceil(keep_ratio * n) of the n prompt key blocks and, apart,
  ceil(keep_ratio * m) of the m answer key blocks (each region ranked on attention renormalised
  within it, so the long prompt cannot crowd out the answer);
- that mask is cached and reused for every later step.

The sampler drives it: set `schedule.step = t` before each model call; the attention layers call
`schedule(q, k, layer)` and get None (dense) or the cached head group.
"""

from __future__ import annotations

import math

import torch

from sparta.attention.layout import BlockLayout, HeadGroup
from sparta.attention.selection import attention_block_mass


class SparseDSchedule:
    """Layout provider for a T-step denoising run (see the module docstring).

    `keep_ratio=None` picks SparseD's defaults: 0.3 for contexts of at least `long_context` tokens,
    0.5 for shorter ones. `prompt_len` tokens at the start are the prompt, the rest the answer.
    A new run (different prompt) gets a new schedule.
    """

    def __init__(self, num_steps: int, *, skip_ratio: float = 0.2, keep_ratio: float | None = None,
                 block: int = 128, prompt_len: int = 0, long_context: int = 4096):
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps: expected an int >= 1, got {num_steps!r}")
        if not 0.0 <= skip_ratio <= 1.0:
            raise ValueError(f"skip_ratio: expected a fraction in [0, 1], got {skip_ratio!r}")
        if keep_ratio is not None and not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio: expected a fraction in (0, 1], got {keep_ratio!r}")
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"block: expected a positive int, got {block!r}")
        if not isinstance(prompt_len, int) or prompt_len < 0:
            raise ValueError(f"prompt_len: expected an int >= 0, got {prompt_len!r}")
        self.num_steps, self.skip_ratio, self.keep_ratio = num_steps, skip_ratio, keep_ratio
        self.block, self.prompt_len, self.long_context = block, prompt_len, long_context
        self.switch_step = math.ceil(skip_ratio * num_steps)
        self._step = 0
        self._cache: dict[int, list[HeadGroup]] = {}

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, step: int) -> None:
        if not isinstance(step, int) or not 0 <= step < self.num_steps:
            raise ValueError(f"step: expected an int in [0, {self.num_steps}), got {step!r}")
        if step < self.switch_step:  # back in the dense phase: a new denoising run
            self._cache.clear()
        self._step = step

    def __call__(self, q: torch.Tensor, k: torch.Tensor, layer: int) -> list[HeadGroup] | None:
        if self._step < self.switch_step:
            return None
        if layer not in self._cache:
            self._cache[layer] = [HeadGroup(tuple(range(q.shape[1])), self.select(q, k))]
        return self._cache[layer]

    def select(self, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
        """The head-specific top-k block mask from this step's attention (prompt and answer apart)."""
        length_q, length_k = q.shape[-2], k.shape[-2]
        if self.prompt_len > length_k:
            raise ValueError(f"prompt_len: {self.prompt_len} exceeds the sequence length {length_k}")
        keep = self.keep_ratio
        if keep is None:
            keep = 0.3 if length_k >= self.long_context else 0.5
        blocks_k = -(-length_k // self.block)
        # A key block belongs to the prompt iff it starts inside it.
        prompt_blocks = -(-self.prompt_len // self.block)
        regions = [(0, prompt_blocks), (prompt_blocks, blocks_k)]
        regions = [(lo, hi) for lo, hi in regions if hi > lo]
        mass = attention_block_mass(q, k, self.block, self.block, region_starts=[lo for lo, _ in regions])
        mask = torch.zeros_like(mass, dtype=torch.bool)
        for lo, hi in regions:
            chosen = mass[..., lo:hi].topk(math.ceil(keep * (hi - lo)), dim=-1).indices
            mask[..., lo:hi].scatter_(-1, chosen, True)
        return BlockLayout(mask, length_q, length_k, self.block, self.block)
