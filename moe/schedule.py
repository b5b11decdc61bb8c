"""`ChunkSparsityScheduler`: BlockFFN's adaptive weight of the chunk-sparsification loss.

BlockFFN's pre-training does not keep that weight fixed. In thunlp/BlockFFN,
pretrain/apps/dragonfly_2b/pretrain_dragonfly.py, `get_value_scheduler` wraps the initial
coefficient (`--chunk_regularization_factor`, 5e-2) in an `AdaptiveLinearScheduler`
(pretrain/cpm/training_utils/value_scheduler.py) with `stable_iter=1000`, `step_iter=100` (times
the gradient-accumulation steps), `max_factor`/`min_factor` from `--scheduler_max_factor 4.0
--scheduler_min_factor 1.025` (every run of pretrain/entrance.sh turns it on with
`--use_value_scheduler`); the training loop calls `value_scheduler.step(iteration,
global_chunk_loss, can_step=...)` and weights the chunk loss of that iteration by what it returns.
The measurement is the *chunk-sparsification loss itself*, unweighted, averaged over the layers and
the data-parallel ranks: a chunk's probability of using an expert, which falls as chunk sparsity
rises. Its rule, `AdaptiveLinearScheduler.step`:

- the coefficient keeps its initial value for the first `stable_steps` steps;
- from then on, every `window_steps` steps, ratio = mean loss of the window that just ended / mean
  loss of the window before; a rising loss (ratio > 1) raises the coefficient by at least
  `min_factor` (ratio = max(min_factor, ratio)), a falling loss lowers it in proportion; the
  target value * ratio is capped at `max_factor` times the initial coefficient;
- over the next window the coefficient moves linearly to that target (`LinearScheduler`).
"""
import math


class ChunkSparsityScheduler:
    """The reference's `AdaptiveLinearScheduler` (see the module docstring) in optimizer steps.

    Call `update(chunk_loss)` once per optimizer step, after it, with that step's unweighted
    chunk-sparsification loss averaged over the BlockFFN layers, micro-batches and data-parallel
    ranks (`aux.losses["chunk_sparsity"] / config.chunk_sparsity_coef`; not CLS, which moves the
    other way); it returns the coefficient of the next step, to write into every BlockFFN layer's
    `MoEConfig.chunk_sparsity_coef`. `coef` is the current one (`initial_coef` before any update).
    The reference counts micro-batches, with windows of 100 and a stable phase of 1000 optimizer
    steps' worth of them and changes only at optimizer steps: with equal micro-batches per step,
    these are the same windows and the same window means, and the coefficient is that of each step's
    last micro-batch (the reference's ramp also moves between the micro-batches of one step).
    `state_dict()` / `load_state_dict()` hold everything, the settings included, as plain numbers.
    """

    def __init__(self, initial_coef: float = 5e-2, *, stable_steps: int = 1000, window_steps: int = 100,
                 max_factor: float = 4.0, min_factor: float = 1.025):
        for name, value in (("initial_coef", initial_coef), ("max_factor", max_factor), ("min_factor", min_factor)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"ChunkSparsityScheduler: {name} must be a finite number > 0, got {value!r}")
        if not (isinstance(window_steps, int) and window_steps >= 1):
            raise ValueError(f"ChunkSparsityScheduler: window_steps must be an int >= 1, got {window_steps!r}")
        if not (isinstance(stable_steps, int) and stable_steps > window_steps):
            raise ValueError(f"ChunkSparsityScheduler: stable_steps must be an int > window_steps={window_steps} (the "
                             f"first change compares two whole windows), got {stable_steps!r}")
        self.initial_coef, self.stable_steps, self.window_steps = float(initial_coef), stable_steps, window_steps
        self.max_factor, self.min_factor = float(max_factor), float(min_factor)
        self.steps = 0
        # The linear ramp now followed: from ramp_start to ramp_start * ramp_ratio over ramp_length steps.
        self.ramp_start, self.ramp_ratio, self.ramp_length, self.ramp_done = self.initial_coef, 1.0, stable_steps, 0
        self.previous_window: list[float] = []
        self.current_window: list[float] = []

    @property
    def coef(self) -> float:
        progress = min(1.0, self.ramp_done / max(1, self.ramp_length))
        return self.ramp_start * (self.ramp_ratio + (1.0 - self.ramp_ratio) * (1.0 - progress))

    def update(self, chunk_loss: float) -> float:
        """Record one optimizer step's chunk-sparsification loss (a float or 0-dim tensor, > 0);
        returns the coefficient of the next step."""
        loss = float(chunk_loss)
        if not (math.isfinite(loss) and loss > 0):
            raise ValueError(f"ChunkSparsityScheduler.update: chunk_loss must be a finite number > 0 (the unweighted "
                             f"chunk-sparsification loss), got {loss!r}")
        self.steps += 1
        self.current_window.append(loss)
        if self.steps % self.window_steps == 0:
            ended, before = self.current_window, self.previous_window
            self.previous_window, self.current_window = ended, []
            if self.steps >= self.stable_steps:
                ratio = (sum(ended) / len(ended)) / (sum(before) / len(before))
                if ratio > 1:
                    ratio = max(self.min_factor, ratio)
                start = self.coef
                ratio = min(self.initial_coef * self.max_factor / start, ratio)
                self.ramp_start, self.ramp_ratio, self.ramp_length, self.ramp_done = start, ratio, self.window_steps, 0
        self.ramp_done += 1
        return self.coef

    def state_dict(self) -> dict:
        return {name: list(value) if isinstance(value, list) else value for name, value in vars(self).items()}

    def load_state_dict(self, state: dict) -> None:
        missing = set(vars(self)) - set(state)
        if missing:
            raise ValueError(f"ChunkSparsityScheduler.load_state_dict: the state lacks {sorted(missing)}")
        for name in vars(self):
            value = state[name]
            setattr(self, name, list(value) if isinstance(value, list) else value)
