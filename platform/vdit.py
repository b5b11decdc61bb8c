"""A class-conditional video diffusion transformer (DiT: Peebles & Xie, 2023) trained by flow matching,
with 3-D rotary embeddings, tokens in tile-major order and dense or Mixture-of-Experts FFNs.

    video [B, C, T, H, W] -> 3-D patches -> tokens in tile-major order          patchify, once
    each block: x + gate * attention(modulate(norm(x))), x + gate * ffn(modulate(norm(x)))
    final AdaLN + linear -> patches -> raster order -> velocity [B, C, T, H, W]  unpatchify, once

Token order. The patches form the token grid `cfg.grid` (frames, rows, columns). From patchify to
unpatchify the tokens are in `TileOrder(grid, cfg.tile)` order: tile after tile (raster order over
the tiles, raster order inside a tile; where the tile does not divide the grid, the smaller edge
tiles after all the whole ones). That is the order in which `sparta.attention.video.tiles(grid,
tile, ...)` hands tokens to its kernel, so with blocks of one tile a token's block is its tile, a
sliding-tile window is whole blocks, and the layout's block mask applies to the model's tokens as
they are: no attention call needs to permute them. The 3-D rotary embedding rotates each token by
its own (frame, row, column) (SparseAttention's `token_order`). Build a layout or plan for the model
with `token_order=model.order` (`Pattern.build`, `Plan`): every pattern is then cut in the model's
order, and all heads of a layer run in one kernel call on the tokens as they are.

Conditioning: AdaLN-zero. The timestep (sinusoidal features, then an MLP) plus the class embedding
(one extra row, the null class, which training swaps in with probability `class_dropout` for
classifier-free guidance) give every block the shift, scale and gate of its two branches, and the
final layer a shift and scale. The modulations and the output projection start at zero, so every
block starts as the identity and the model as the velocity 0.

Sequence parallelism (`sp_group`, training): each of the P ranks of the group takes an equal, contiguous
share of the tile-major tokens (whole tiles where the tiles divide N / P), the attention layers trade
it for whole heads (Ulysses all-to-alls, a plan's heads following them), and the rank's loss is the
MSE over its own tokens, so the group's mean is the whole clips' loss. `velocity` gathers the shares.

Flow matching (rectified flow): x_t = (1 - t) x0 + t noise; the model predicts the velocity
v = noise - x0 under an MSE loss. t ~ logit-normal(0, 1) (SD3: Esser et al., 2024, the best of the
schedules they compared): it spends the training on middle t, where the velocity is hardest to
predict, rather than near t = 0 or 1, where x_t nearly gives it away. `sample` integrates
dx/dt = v from t = 1 (noise) to t = 0 with Euler steps and classifier-free guidance.

The benchmark grid, 13 x 30 x 52 = 20,280 tokens (a 49-frame 480x832 clip through Wan 2.1's VAE and
its (1, 2, 2) patches), is one config away: `model.frames=13 model.height=60 model.width=104
model.patch=[1,2,2] model.tile=[1,8,16]`; in pixels, 52 x 480 x 832 with `model.patch=[4,16,16]` is
the same grid. No tile of a kernel block size (16 .. 128 tokens) divides 13 x 30 x 52 (the largest
power-of-two one is 1 x 2 x 4), so the grid keeps edge tiles: with the 128-token tile (1, 8, 16) of
benchmarks/patterns.py, 117 whole tiles (14,976 tokens, whole blocks), then 5,304 edge-tile tokens.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sparta.attention import (
    Plan,
    SparseAttention,
    TileOrder,
    VideoGrid,
    invert_permutation,
    sequence_gather,
    sequence_shard,
)
from sparta.attention.module import BACKENDS
from sparta.moe import MoE, MoEConfig
from sparta.platform.dlm import use_attention
from sparta.platform.lm import (
    FFN_KINDS,
    CheckpointedBlock,
    LMConfig,
    SwiGLU,
    TransformerLM,
    active_weights,
    run_blocks,
    with_aux_losses,
)
from sparta.platform.noise import NoiseStreams

TIME_FEATURES = 256         # sinusoidal timestep features (DiT's)


@dataclass
class VDiTConfig:
    family: str = "vdit"
    frames: int = 8                          # the clips: frames x height x width pixels of in_channels
    height: int = 32
    width: int = 32
    in_channels: int = 3
    patch: tuple[int, int, int] = (2, 4, 4)  # (pt, ph, pw): token grid (frames / pt, height / ph, width / pw)
    tile: tuple[int, int, int] = (2, 4, 4)   # tokens (frames, rows, columns) per tile of the token order
    num_classes: int = 16                    # labels 0 .. num_classes - 1; num_classes is the null class
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0                   # the dense FFN: a SwiGLU of width mlp_ratio * d_model
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    class_dropout: float = 0.1               # training labels swapped for the null class (classifier-free guidance)
    attention_backend: str = "triton"        # what runs a sparse layout once one is set; without one, SDPA
    ffn: str = "dense"                       # "dense" | "moe" (sparta.moe.MoE, configured by `moe`)
    moe_every: int = 1                       # with ffn="moe": every n-th block has an MoE FFN ...
    first_dense_layers: int = 0              # ... after this many dense blocks
    moe: MoEConfig | None = None
    plan: str | None = None                  # a searched attention plan (launch/search.py's plan.yaml): sparse attention

    is_moe_layer = LMConfig.is_moe_layer

    def __post_init__(self):
        self.patch, self.tile = _triple("patch", self.patch), _triple("tile", self.tile)
        for key in ("frames", "height", "width", "in_channels", "num_classes", "d_model", "n_layers", "n_heads",
                    "moe_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{key}={value!r}: expected a positive int")
        for axis, (key, patch) in enumerate(zip(("frames", "height", "width"), self.patch)):
            if getattr(self, key) % patch:
                raise ValueError(f"model.{key}={getattr(self, key)}: expected a multiple of model.patch[{axis}]={patch} "
                                 f"(whole patches)")
        grid = (self.grid.frames, self.grid.height, self.grid.width)
        if any(t > g for t, g in zip(self.tile, grid)):
            raise ValueError(f"model.tile={self.tile}: expected at most the token grid {grid} on each axis (a tile "
                             f"counts tokens, not pixels)")
        head_dim = self.d_model // self.n_heads
        if self.d_model % self.n_heads or head_dim % 2:
            raise ValueError(f"model.n_heads={self.n_heads}: expected a divisor of model.d_model={self.d_model} "
                             "that leaves an even head dim (rotary pairs)")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"model.class_dropout={self.class_dropout!r}: expected in [0, 1)")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"model.attention_backend={self.attention_backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.ffn not in FFN_KINDS or (self.ffn == "moe") != (self.moe is not None):
            raise ValueError(f"model.ffn={self.ffn!r}: expected 'dense', or 'moe' together with an MoE config")

    @property
    def grid(self) -> VideoGrid:
        return VideoGrid(self.frames // self.patch[0], self.height // self.patch[1], self.width // self.patch[2])

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch[0] * self.patch[1] * self.patch[2]

    @property
    def d_ff(self) -> int:
        return round(self.mlp_ratio * self.d_model)

    @property
    def null_class(self) -> int:
        return self.num_classes


class DiTBlock(CheckpointedBlock):
    """Attention and FFN branches, each AdaLN-zero modulated by the conditioning `cond` [B, d_model].

    Called by `lm.run_blocks` as `block(x, doc_ids, prev_router_logits, cond)`, as the LM's blocks are.
    """

    def __init__(self, cfg: VDiTConfig, layer: int, order: TileOrder, ep_group=None, sp_group=None):
        super().__init__()
        d = cfg.d_model
        self.attention_norm = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.norm_eps)
        self.attention = SparseAttention(d, cfg.n_heads, rotary="3d", grid=cfg.grid, token_order=order,
                                         rotary_base=cfg.rope_theta, layer=layer, backend=cfg.attention_backend,
                                         sequence_group=sp_group)
        self.ffn_norm = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.norm_eps)
        self.ffn = MoE(d, cfg.moe, ep_group) if cfg.is_moe_layer(layer) else SwiGLU(d, cfg.d_ff)
        self.modulation = nn.Linear(d, 6 * d)

    def _forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None, prev_router_logits: torch.Tensor | None,
                 cond: torch.Tensor):
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.modulation(F.silu(cond))[:, None].chunk(6, dim=-1)
        x = x + gate_a * self.attention(modulate(self.attention_norm(x), shift_a, scale_a))
        h = modulate(self.ffn_norm(x), shift_f, scale_f)
        if not isinstance(self.ffn, MoE):
            return x + gate_f * self.ffn(h), None
        y, aux = self.ffn(h, prev_router_logits=prev_router_logits, doc_ids=doc_ids)
        return x + gate_f * y, aux


class VideoDiT(nn.Module):
    """The trainer's contract: `model(videos, labels)` -> `(loss, metrics)`, the flow-matching loss of
    clean `videos` [B, C, T, H, W] with class `labels` [B] (plus the MoE auxiliary losses) and detached
    metrics (`loss` the flow-matching MSE, `aux_loss`, `moe/layers/<stat>`); `velocity(x_t, t,
    labels)` for sampling; `flops_per_token` for MFU. ep_group: as the LM's (`platform/lm.py`).
    """

    def __init__(self, cfg: VDiTConfig, ep_group=None, sp_group=None):
        super().__init__()
        ranks = 1 if sp_group is None else dist.get_world_size(sp_group)
        if cfg.grid.tokens % ranks or cfg.n_heads % ranks:
            raise ValueError(f"parallel.sequence={ranks}: expected a divisor of the {cfg.grid.tokens} tokens of the grid "
                             f"{cfg.grid} and of model.n_heads={cfg.n_heads}")
        self.cfg, self.sp_group = cfg, sp_group
        init_seed = int(torch.randint(0, 2**62, ()))  # before the layers draw their own (layout-dependent) inits
        self.order = TileOrder(cfg.grid, cfg.tile)
        d = cfg.d_model
        self.patch_embed = nn.Linear(cfg.patch_dim, d)
        self.time_embed = nn.Sequential(nn.Linear(TIME_FEATURES, d), nn.SiLU(), nn.Linear(d, d))
        self.class_embed = nn.Embedding(cfg.num_classes + 1, d)  # + the null class
        self.blocks = nn.ModuleList(DiTBlock(cfg, layer, self.order, ep_group, sp_group) for layer in range(cfg.n_layers))
        self.moe_layers = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.norm_eps)
        self.final_modulation = nn.Linear(d, 2 * d)
        self.final = nn.Linear(d, cfg.patch_dim)
        self._init_weights(init_seed, ep_group)
        if cfg.plan is not None:
            plan = Plan.load(cfg.plan)
            check_plan(plan, cfg, "model.plan")
            use_attention(self, plan, cfg.attention_backend)
        self.noise = NoiseStreams(sp_group)

    def _init_weights(self, seed: int, ep_group) -> None:
        """The LM's layout-independent init (each weight drawn whole from a generator seeded by `seed`
        and its name; residual outputs scaled by 1/sqrt(2 n_layers)), then every bias zero and
        AdaLN-zero: the modulations and the output projection zero."""
        TransformerLM._init_weights(self, seed, ep_group)
        zero = [self.final, self.final_modulation, *(block.modulation for block in self.blocks)]
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.zero_()
            for module in zero:
                module.weight.zero_()

    def train(self, mode: bool = True):
        self.noise.restart_eval()
        return super().train(mode)

    # ---- tokens -------------------------------------------------------------------------------------

    def patchify(self, videos: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> tokens [B, N, C * pt * ph * pw] in tile-major order."""
        (pt, ph, pw), grid = self.cfg.patch, self.cfg.grid
        batch, channels = videos.shape[:2]
        patches = videos.reshape(batch, channels, grid.frames, pt, grid.height, ph, grid.width, pw)
        tokens = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(batch, grid.tokens, -1)  # raster order
        return tokens.index_select(1, self.order.permutation(videos.device))

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """The inverse of `patchify`: tokens [B, N, C * pt * ph * pw] in tile-major order -> [B, C, T, H, W]."""
        cfg, grid = self.cfg, self.cfg.grid
        raster = tokens.index_select(1, invert_permutation(self.order.permutation(tokens.device)))
        patches = raster.reshape(tokens.shape[0], grid.frames, grid.height, grid.width, cfg.in_channels, *cfg.patch)
        return patches.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(tokens.shape[0], cfg.in_channels, cfg.frames,
                                                               cfg.height, cfg.width)

    # ---- the network --------------------------------------------------------------------------------

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The predicted velocity [B, C, T, H, W] (in the weights' dtype) at `x_t` [B, C, T, H, W], times
        `t` [B] in [0, 1], `labels` [B] (the null class `cfg.num_classes` for unconditional)."""
        self._check_inputs(x_t, labels, "x_t")
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t: expected shape ({x_t.shape[0]},) (one time per clip), got {tuple(t.shape)}")
        tokens, _ = self._predict(x_t, t, labels)
        return self.unpatchify(tokens if self.sp_group is None else sequence_gather(tokens, self.sp_group))

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor):
        """The velocity of this rank's tokens [B, N / P, patch_dim] (tile-major; all N without a sequence
        group) and the MoE layers' aux outputs."""
        dtype = self.patch_embed.weight.dtype  # the engine's (bf16 under DeepSpeed); inputs come in fp32
        x = self.patch_embed(self._own_tokens(x_t).to(dtype))
        cond = self.time_embed(timestep_features(t).to(dtype)) + self.class_embed(labels)
        x, auxes = run_blocks(self.blocks, x, None, cond)
        shift, scale = self.final_modulation(F.silu(cond))[:, None].chunk(2, dim=-1)
        return self.final(modulate(self.final_norm(x), shift, scale)), auxes

    def _own_tokens(self, videos: torch.Tensor) -> torch.Tensor:
        """The patches of this rank's share of the tile-major tokens: whole tiles, as far as tiles divide N / P."""
        tokens = self.patchify(videos)
        return tokens if self.sp_group is None else sequence_shard(tokens, self.sp_group)

    def forward(self, videos: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        self._check_inputs(videos, labels, "videos")
        x0 = videos.float()
        dropout = self.cfg.class_dropout if self.training else 0.0
        noise, t, labels = draw_flow_inputs(x0, labels, dropout, self.cfg.null_class, self.noise.next(self.training, x0.device))
        prediction, auxes = self._predict(interpolate(x0, noise, t), t, labels)
        # on this rank's tokens: equal shards, so the sequence group's mean is the whole clips' MSE
        loss = flow_matching_loss(prediction, self._own_tokens(x0), self._own_tokens(noise))
        return with_aux_losses(loss, auxes, self.cfg.moe)

    def _check_inputs(self, videos: torch.Tensor, labels: torch.Tensor, name: str) -> None:
        cfg = self.cfg
        expected = (cfg.in_channels, cfg.frames, cfg.height, cfg.width)
        if videos.dim() != 5 or tuple(videos.shape[1:]) != expected or not videos.is_floating_point():
            raise ValueError(f"{name}: expected a float [B, C, T, H, W] = [B, {', '.join(map(str, expected))}] tensor "
                             f"(model.in_channels, frames, height, width), got {videos.dtype} {tuple(videos.shape)}")
        if (labels.shape != videos.shape[:1] or labels.is_floating_point() or labels.dtype == torch.bool
                or bool(((labels < 0) | (labels > cfg.null_class)).any())):
            raise ValueError(f"labels: expected class ids in [0, model.num_classes={cfg.num_classes}] (the last: null) "
                             f"of shape ({videos.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")

    def flops_per_token(self, seq_len: int, experts_per_token: dict[int, float] | None = None) -> float:
        """Training FLOPs per video token (forward + backward = 3x forward): 6 per matmul weight a token
        goes through (patch embedding, attention and FFN projections, routed experts counted
        `experts_per_token[layer]` times, the measured average, else top_k; the output projection)
        plus attention scores and values, 12 * n_layers * d_model * seq_len: every query against all
        `seq_len` keys (bidirectional; lm.py's convention, which counts the causal half too). The
        conditioning (timestep MLP, class embedding, modulations) runs once per clip, not per token."""
        cfg = self.cfg
        layers = ((layer, [*block.attention.parameters(), *block.ffn.parameters()])
                  for layer, block in enumerate(self.blocks))
        active = active_weights(self, layers, experts_per_token)
        active += self.patch_embed.weight.numel() + self.final.weight.numel()
        return 6.0 * active + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def timestep_features(t: torch.Tensor, dim: int = TIME_FEATURES) -> torch.Tensor:
    """DiT's sinusoidal features of 1000 t, fp32 [B, dim]: cosines then sines, periods 1 .. 10^4 / (2 pi)."""
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device, dtype=torch.float32) / (dim // 2))
    angles = 1000.0 * t.float()[:, None] * frequencies
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def draw_flow_inputs(x0: torch.Tensor, labels: torch.Tensor, class_dropout: float, null_class: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training example per clip: (noise ~ N(0, I) like x0, t ~ logit-normal(0, 1) [B], the labels
    with a share `class_dropout` of them swapped for `null_class`)."""
    batch = x0.shape[0]
    t = torch.sigmoid(torch.randn(batch, generator=generator, device=x0.device))
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    dropped = torch.rand(batch, generator=generator, device=x0.device) < class_dropout
    return noise, t, torch.where(dropped, null_class, labels)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, t [B] per clip."""
    t = t.view(-1, *[1] * (x0.dim() - 1))
    return (1 - t) * x0 + t * noise


def flow_matching_loss(prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MSE (fp32) between the predicted velocity and the rectified flow's, v = noise - x0, in any layout
    (videos, or the patches of a rank's tokens)."""
    return F.mse_loss(prediction.float(), noise - x0)


def check_plan(plan: Plan, cfg: VDiTConfig, source: str) -> None:
    """A plan must be for the model's token grid, token order, layers and heads; the message names
    `source` (the key that gave the plan) and what differs."""
    order = plan.token_order.tile if plan.token_order else None
    for what, got, expected in (
            ("token grid", plan.grid, cfg.grid), ("token order tile", order, cfg.tile),
            ("layers", sorted(plan.layers), list(range(cfg.n_layers))),
            ("heads per layer", sorted({len(heads) for heads in plan.layers.values()}), [cfg.n_heads])):
        if got != expected:
            raise ValueError(f"{source}: a plan for {what} {got}, this model has {expected}")


@torch.no_grad()
def sample(model: VideoDiT, noise: torch.Tensor, labels: torch.Tensor, steps: int, cfg_scale: float = 1.0,
           on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Videos [B, C, T, H, W] (fp32) from `noise` at t = 1: `steps` Euler steps of dx/dt = v to t = 0.

    cfg_scale > 1: classifier-free guidance, v = v_null + cfg_scale * (v_label - v_null), the
    conditional and unconditional halves in one batch; 1: the conditional velocity alone.
    on_step(step) after each step 1..steps (a progress bar, a step clock).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    times = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    x = noise.float()
    guided = cfg_scale != 1.0
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, model.cfg.null_class)])
    for step, (t, t_next) in enumerate(zip(times[:-1], times[1:]), 1):
        batch_x = torch.cat([x, x]) if guided else x
        v = model.velocity(batch_x, t.expand(batch_x.shape[0]), labels).float()
        if guided:
            v_label, v_null = v.chunk(2)
            v = v_null + cfg_scale * (v_label - v_null)
        x = x + (t_next - t) * v
        if on_step is not None:
            on_step(step)
    return x


def _triple(key: str, value) -> tuple[int, int, int]:
    value = tuple(value) if isinstance(value, (list, tuple)) else value
    if (not isinstance(value, tuple) or len(value) != 3
            or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in value)):
        raise ValueError(f"model.{key}={value!r}: expected three positive ints (frames, rows, columns)")
    return value
