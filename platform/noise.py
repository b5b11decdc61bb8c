"""Where a diffusion model's forward process draws its randomness (masks, noise, timesteps, labels dropped).

Training: one stream per data shard. Ray Train seeds every rank alike, and the same draws on every
rank would waste the data-parallel batch; the ranks of a sequence-parallel group (neighbouring
ranks) split the same samples, so they share one stream. Validation: a fixed stream per pass, so
that every `val/loss` compares the same draws.
"""

import torch
import torch.distributed as dist

EVAL_SEED = 20250214


class NoiseStreams:
    def __init__(self, sp_group=None):
        self.sp_group = sp_group
        self._train: torch.Generator | None = None
        self._eval_draws = 0

    def restart_eval(self) -> None:
        """The next validation pass draws what the previous ones drew (called from `model.train(mode)`)."""
        self._eval_draws = 0

    def next(self, training: bool, device: torch.device) -> torch.Generator:
        if not training:
            self._eval_draws += 1
            return torch.Generator(device).manual_seed(EVAL_SEED + self._eval_draws)
        if self._train is None or self._train.device != device:
            shards = 1 if self.sp_group is None else dist.get_world_size(self.sp_group)
            shard = dist.get_rank() // shards if dist.is_initialized() else 0
            self._train = torch.Generator(device).manual_seed(torch.initial_seed() + 1 + shard)
        return self._train
