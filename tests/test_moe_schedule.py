"""`ChunkSparsityScheduler` against BlockFFN's reference rule (thunlp/BlockFFN,
pretrain/cpm/training_utils/value_scheduler.py: `AdaptiveLinearScheduler` over `LinearScheduler`,
transcribed below without its logging) on scripted sequences of chunk losses, a hand-computed case,
and checkpointing. Coefficients agree to 1e-12 relative (the window means are summed in another order)."""
import json

import pytest

from sparta.moe import ChunkSparsityScheduler


class ReferenceLinearScheduler:
    """`LinearScheduler` as `AdaptiveLinearScheduler` builds it (warmup_iter=0, num_iter=0)."""

    def __init__(self, start_val, end_iter, target_ratio):
        self.start_val, self.end_iter, self.target_ratio, self.num_iter = start_val, end_iter, target_ratio, 0
        self.current_val = self.value()

    def value(self):
        progress = 1 - min(1, self.num_iter / max(1, self.end_iter))
        if self.target_ratio <= 1:
            return self.start_val * (self.target_ratio + max((1.0 - self.target_ratio) * progress, 0))
        return self.start_val * (self.target_ratio + min((1.0 - self.target_ratio) * progress, 0))

    def step(self):
        self.num_iter += 1
        self.current_val = self.value()


class ReferenceAdaptiveLinearScheduler:
    """`AdaptiveLinearScheduler` with warmup_iter=0 and start_step=0, as `get_value_scheduler` builds it."""

    def __init__(self, start_val, stable_iter, step_iter, max_factor, min_factor):
        self.init_start_val = self.cur_start_val = start_val
        self.stable_iter, self.step_iter, self.max_factor, self.min_factor = stable_iter, step_iter, max_factor, min_factor
        self.min_loss_container, self.max_loss_container = [], []
        self.cur_scheduler = ReferenceLinearScheduler(start_val, stable_iter, 1.0)

    def step(self, iteration, loss, can_step):
        self.max_loss_container.append(loss)
        mean = lambda values: sum(values) / len(values) if values else -1  # noqa: E731
        min_loss, max_loss = mean(self.min_loss_container), mean(self.max_loss_container)
        if iteration % self.step_iter == 0:
            self.min_loss_container = self.max_loss_container
            self.max_loss_container = []
        res_val = self.cur_scheduler.current_val
        if can_step and iteration >= self.stable_iter and iteration % self.step_iter == 0:
            self.cur_start_val = res_val
            assert min_loss > 0 and max_loss > 0
            target_ratio = max_loss / min_loss
            base_target_ratio = max(self.min_factor, target_ratio) if target_ratio > 1 else target_ratio
            target_ratio = min(self.init_start_val * self.max_factor / self.cur_start_val, base_target_ratio)
            self.cur_scheduler = ReferenceLinearScheduler(self.cur_start_val, self.step_iter, target_ratio)
        self.cur_scheduler.step()
        return res_val


# Flat, rising slowly (min_factor wins), rising fast (the cap wins), falling, noisy.
LOSSES = ([0.30] * 12 + [0.31, 0.31, 0.32, 0.33, 0.33, 0.34] + [0.5, 0.6, 0.7, 0.9, 1.0, 1.2, 1.5, 1.6, 1.8]
          + [0.9, 0.7, 0.5, 0.4, 0.35, 0.3] + [0.3 + 0.05 * ((i * 7) % 5 - 2) for i in range(24)])


def coefficients(scheduler, losses):
    """The coefficient each step trains with: the initial one, then what each update returns."""
    used = [scheduler.coef]
    for loss in losses[:-1]:
        used.append(scheduler.update(loss))
    return used


@pytest.mark.parametrize("stable, window, max_factor, min_factor", [(6, 3, 4.0, 1.025), (9, 4, 2.0, 1.2), (5, 2, 1.5, 1.0)])
def test_matches_the_reference_rule(stable, window, max_factor, min_factor):
    reference = ReferenceAdaptiveLinearScheduler(0.05, stable, window, max_factor, min_factor)
    expected = [reference.step(step, loss, can_step=True) for step, loss in enumerate(LOSSES, start=1)]
    scheduler = ChunkSparsityScheduler(0.05, stable_steps=stable, window_steps=window, max_factor=max_factor,
                                       min_factor=min_factor)
    assert coefficients(scheduler, LOSSES) == pytest.approx(expected, rel=1e-12)
    assert max(expected) == pytest.approx(0.05 * max_factor) and min(expected) < 0.05  # reaches the cap, and falls


def test_matches_the_reference_counting_micro_batches():
    """The reference steps every micro-batch (2 here) and changes at optimizer steps: with the same loss in
    both micro-batches of a step, each step's coefficient is the one of its last micro-batch."""
    accumulation = 2
    reference = ReferenceAdaptiveLinearScheduler(0.05, 6 * accumulation, 3 * accumulation, 4.0, 1.025)
    expected = []
    for step, loss in enumerate(LOSSES):
        for micro in range(1, accumulation + 1):
            iteration = step * accumulation + micro
            value = reference.step(iteration, loss, can_step=iteration % accumulation == 0)
            if micro == accumulation:
                expected.append(value)
    scheduler = ChunkSparsityScheduler(0.05, stable_steps=6, window_steps=3)
    assert coefficients(scheduler, LOSSES) == pytest.approx(expected, rel=1e-12)


def test_hand_computed_case():
    """stable 4, window 2, min factor 1.5, cap 3x. Step 6: the loss doubled, ramp 1 -> 2. Step 8: +10%, raised
    by min_factor 1.5 to 3 (exactly the cap). Step 10: the loss halved, ramp 3 -> 1.5."""
    scheduler = ChunkSparsityScheduler(1.0, stable_steps=4, window_steps=2, max_factor=3.0, min_factor=1.5)
    returned = [scheduler.update(loss) for loss in [1, 1, 1, 1, 2, 2, 2.2, 2.2, 1.1, 1.1, 1.1]]
    assert returned == pytest.approx([1, 1, 1, 1, 1, 1.5, 2, 2.5, 3, 2.25, 1.5])
    assert scheduler.coef == returned[-1]


def test_state_dict_resumes_exactly():
    whole = ChunkSparsityScheduler(0.05, stable_steps=6, window_steps=3)
    expected = coefficients(whole, LOSSES)
    first = ChunkSparsityScheduler(0.05, stable_steps=6, window_steps=3)
    used = coefficients(first, LOSSES[:20])
    first.update(LOSSES[19])
    resumed = ChunkSparsityScheduler()  # other settings: the state carries them
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    used += [resumed.coef] + [resumed.update(loss) for loss in LOSSES[20:-1]]
    assert used == pytest.approx(expected, rel=0)


def test_bad_input():
    with pytest.raises(ValueError, match="stable_steps"):
        ChunkSparsityScheduler(stable_steps=100, window_steps=100)
    with pytest.raises(ValueError, match="initial_coef"):
        ChunkSparsityScheduler(0.0)
    with pytest.raises(ValueError, match="chunk_loss"):
        ChunkSparsityScheduler().update(float("nan"))
    with pytest.raises(ValueError, match="lacks"):
        ChunkSparsityScheduler().load_state_dict({"steps": 3})
