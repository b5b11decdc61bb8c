"""A decoder-only transformer language model (Llama-style: RMSNorm, rotary embeddings, SwiGLU, GQA),
with dense or Mixture-of-Experts FFNs (`sparta.moe.MoE`: top-k, BlockFFN or MoE++ routers).

One block is `x + attention(norm(x))` then `x + ffn(norm(x))`. The FFN is a SwiGLU or an MoE layer
(`ffn="moe"`: every `moe_every`-th block after the first `first_dense_layers`, as DeepSeek-MoE). The
trainer's contract: `model(inputs, targets)` returns the loss to minimise (cross-entropy plus the MoE
auxiliary losses) and a dict of detached metrics; `model(inputs)` returns the logits; and
`flops_per_token` gives the model FLOPs for MFU.
"""

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparta.attention.sequence_parallel import heads_to_sequence, sequence_shard, sequence_to_heads
from sparta.moe import MoE, MoEAux, MoEConfig, load_summary
from sparta.platform.parallel import expert_parameters, local_experts

FFN_KINDS = ("dense", "moe")


@dataclass
class LMConfig:
    vocab_size: int
    family: str = "lm"             # model family (platform/models.py): lm, this LM | dlm, DLMConfig (platform/dlm.py)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    d_ff: int = 384
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    ffn: str = "dense"             # "dense" (SwiGLU of width d_ff) | "moe" (sparta.moe.MoE, configured by `moe`)
    moe_every: int = 1             # with ffn="moe": every n-th block has an MoE FFN ...
    first_dense_layers: int = 0    # ... after this many dense blocks
    moe: MoEConfig | None = None   # the MoE layers' config (ffn="moe")
    eot_id: int | None = None      # end-of-text token: packed documents end there (MoE losses/CLS per document)

    def check_seq_len(self, tokens: torch.Tensor) -> int:
        """`tokens`' sequence length, refused beyond `max_seq_len` (the rotary tables' and the training windows')."""
        seq = tokens.shape[1]
        if seq > self.max_seq_len:
            raise ValueError(f"tokens: sequence length {seq} exceeds model.max_seq_len={self.max_seq_len}")
        return seq

    def is_moe_layer(self, layer: int) -> bool:
        return self.ffn == "moe" and layer >= self.first_dense_layers and (layer - self.first_dense_layers) % self.moe_every == 0


def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[seq_len, head_dim // 2]` for rotating pairs (x[2i], x[2i+1]) by angle pos * theta^(-2i/d)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[batch, heads, seq, head_dim]`; rotation in fp32, result in x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head attention with grouped key/value heads, run by PyTorch SDPA. With a
    sequence-parallel group, x is this rank's shard of the sequence: q, k, v trade it for a share of
    the heads over the whole sequence around SDPA (DeepSpeed-Ulysses)."""

    def __init__(self, cfg: LMConfig, sp_group=None):
        super().__init__()
        self.sp_group = sp_group
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(cfg.d_model, 2 * cfg.n_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(batch, seq, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.sp_group is not None:
            q, k, v = (sequence_to_heads(t, self.sp_group) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=self.n_heads != self.n_kv_heads)
        if self.sp_group is not None:
            out = heads_to_sequence(out, self.sp_group)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class CheckpointedBlock(nn.Module):
    """A block whose work is `_forward`. `checkpointed` (set by the trainer's `activation_checkpointing`):
    keep only the block's inputs for the backward and run the block again there."""

    checkpointed = False

    def forward(self, *args):
        if self.checkpointed and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)


class Block(CheckpointedBlock):
    """`attention`: this block's attention module (default: the LM's causal one); it is called as
    `attention(norm(x), *attention_args)`, the LM passing its rotary tables."""

    def __init__(self, cfg: LMConfig, layer: int, ep_group=None, attention: nn.Module | None = None, sp_group=None):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = Attention(cfg, sp_group) if attention is None else attention
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = MoE(cfg.d_model, cfg.moe, ep_group) if cfg.is_moe_layer(layer) else SwiGLU(cfg.d_model, cfg.d_ff)

    def _forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None, prev_router_logits: torch.Tensor | None,
                 *attention_args) -> tuple[torch.Tensor, MoEAux | None]:
        x = x + self.attention(self.attention_norm(x), *attention_args)
        if not isinstance(self.ffn, MoE):
            return x + self.ffn(self.ffn_norm(x)), None
        y, aux = self.ffn(self.ffn_norm(x), prev_router_logits=prev_router_logits, doc_ids=doc_ids)
        return x + y, aux


class TransformerLM(nn.Module):
    """ep_group: the expert-parallel process group of the MoE layers (each rank builds its share of the
    experts); sp_group: the sequence-parallel group (the model takes whole sequences and runs this
    rank's shard of them: logits, loss and metrics are the shard's). The initial weights are the same
    whatever the layout."""

    def __init__(self, cfg: LMConfig, ep_group=None, sp_group=None):
        super().__init__()
        if cfg.ffn not in FFN_KINDS or (cfg.ffn == "moe") != (cfg.moe is not None):
            raise ValueError(f"model.ffn={cfg.ffn!r}: expected 'dense', or 'moe' together with an MoE config")
        self.cfg = cfg
        init_seed = int(torch.randint(0, 2**62, ()))  # before the layers draw their own (layout-dependent) inits
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.sp_group = sp_group
        self.blocks = nn.ModuleList(Block(cfg, layer, ep_group, sp_group=sp_group) for layer in range(cfg.n_layers))
        self.moe_layers = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Made once, fp32 (DeepSpeed casts the parameters only): computed in the forward, the compiled
        # model recomputed pow and cos in every rotation kernel, forward and backward.
        cos, sin = rotary_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self._init_weights(init_seed, ep_group)

    def _init_weights(self, seed: int, ep_group) -> None:
        """GPT-2 init: N(0, std) everywhere, residual-branch outputs scaled by 1/sqrt(2 * n_layers).

        Each weight is drawn whole from a generator seeded by `seed` and its name, and a routed
        expert weight (all experts) is then cut to this rank's slice: a run at any expert-parallel
        size starts from the same model.
        """
        ep_size = 1 if ep_group is None else torch.distributed.get_world_size(ep_group)
        experts = {name for name, _ in expert_parameters(self)}
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue  # norm gains stay 1
            std = self.cfg.init_std
            if name.endswith(("out_proj.weight", "attention.out.weight", "down.weight", "w_out")):
                std /= math.sqrt(2 * self.cfg.n_layers)
            is_expert = name in experts
            shape = (param.shape[0] * ep_size, *param.shape[1:]) if is_expert else param.shape
            generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
            whole = torch.empty(shape).normal_(0.0, std, generator=generator)
            with torch.no_grad():
                param.copy_(local_experts(whole, ep_group) if is_expert else whole)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """tokens `[batch, seq]` -> logits `[batch, seq, vocab]`; with next-token `targets`, instead
        `(loss, metrics)`: the loss to minimise and detached metrics (`loss` the cross-entropy,
        `aux_loss`, and `moe/layers/<stat>` with a value per MoE layer: `moe_metrics`)."""
        seq = self.cfg.check_seq_len(tokens)
        cos, sin = self.rotary_cos[:seq], self.rotary_sin[:seq]
        doc_ids = document_ids(tokens, self.cfg.eot_id) if self.moe_layers and self.cfg.eot_id is not None else None
        if self.sp_group is not None:  # a token-mean loss: the mean over the group's shards is the sequence's
            tokens, targets, doc_ids = (shard_or_none(t, self.sp_group) for t in (tokens, targets, doc_ids))
            cos, sin = (sequence_shard(t, self.sp_group, dim=0) for t in (cos, sin))
        x, auxes = run_blocks(self.blocks, self.embed(tokens), doc_ids, cos, sin)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        loss = next_token_loss(logits, targets)
        return with_aux_losses(loss, auxes, self.cfg.moe)

    def flops_per_token(self, seq_len: int, ffn_experts_per_token: dict[int, float] | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): 6 per active matmul weight
        (routed experts counted `ffn_experts_per_token[layer]` times, the measured average, k for
        top-k without drops) plus attention scores and values, 12 * n_layers * d_model * seq_len (the
        PaLM / Megatron convention, causal half included). Embedding lookups are not FLOPs."""
        cfg = self.cfg
        layers = ((layer, block.parameters()) for layer, block in enumerate(self.blocks))
        active = active_weights(self, layers, ffn_experts_per_token) + self.head.weight.numel()
        return 6.0 * active + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def active_weights(model: nn.Module, layers, experts_per_token: dict[int, float] | None) -> int:
    """The matmul weights one token goes through in `layers` ((layer index, its parameters)): a routed
    expert's counted as many times as the token uses that layer's experts (`experts_per_token[layer]`,
    the measured average; else the router's top_k)."""
    experts = {id(param) for _, param in expert_parameters(model)}
    active = 0
    for layer, params in layers:
        for param in params:
            if param.dim() < 2:
                continue
            if id(param) in experts:
                per_token = (experts_per_token or {}).get(layer, model.cfg.moe.top_k)
                active += param.numel() // param.shape[0] * per_token  # one expert's weights
            else:
                active += param.numel()
    return active


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, doc_ids: torch.Tensor | None,
               *attention_args) -> tuple[torch.Tensor, dict[int, MoEAux]]:
    """The residual stream through `blocks` (each block's attention gets `attention_args`), MoE++'s
    router logits passed from each MoE layer to the next; returns the output and each MoE layer's aux."""
    auxes, router_logits = {}, None
    for layer, block in enumerate(blocks):
        x, aux = block(x, doc_ids, router_logits, *attention_args)
        if aux is not None:
            auxes[layer], router_logits = aux, aux.router_logits
    return x, auxes


def shard_or_none(x: torch.Tensor | None, sp_group) -> torch.Tensor | None:
    """This rank's shard of a [batch, seq] tensor, if there is one."""
    return None if x is None else sequence_shard(x, sp_group)


def document_ids(tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """[batch, seq] id of the packed document of each token: the end-of-text tokens before it."""
    is_end = (tokens == eot_id).to(torch.int32)
    return is_end.cumsum(1) - is_end


def with_aux_losses(loss: torch.Tensor, auxes: dict[int, MoEAux], cfg: MoEConfig | None):
    """(the task loss plus the MoE layers' auxiliary losses, the metrics to log: `loss` the task loss,
    `aux_loss`, per layer `moe_metrics`)."""
    metrics = {"loss": loss.detach()}
    if auxes:
        aux_loss = sum(aux.loss for aux in auxes.values())
        metrics["aux_loss"] = aux_loss.detach()
        metrics.update(moe_metrics(auxes, cfg))
        loss = loss + aux_loss
    return loss, metrics


def moe_metrics(auxes: dict[int, MoEAux], cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """Every MoE layer's routing stats, expert load and its max / min / coefficient of variation, and for
    BlockFFN the unweighted chunk-sparsification loss (what the trainer's schedule of its weight
    measures), stacked over the layers: `moe/layers/<stat>` [MoE layers], `moe/layers/expert_load`
    [MoE layers, E]. One tensor per statistic, not per layer and statistic: a compiled step returns,
    and the training loop sums every micro-batch, ~20 tensors instead of ~250 (12 MoE++ layers).
    `named_moe_metrics` names them `moe/layer_03/<stat>` once averaged."""
    layers = list(auxes.values())
    stats = {key: [aux.stats[key] for aux in layers] for key in layers[0].stats}
    summaries = [load_summary(aux.expert_load) for aux in layers]
    stats.update({key: [summary[key] for summary in summaries] for key in summaries[0]})
    if "chunk_sparsity" in layers[0].losses and cfg.chunk_sparsity_coef > 0:
        stats["chunk_sparsity_loss"] = [aux.losses["chunk_sparsity"].detach() / cfg.chunk_sparsity_coef
                                        for aux in layers]
    stats["expert_load"] = [aux.expert_load for aux in layers]
    return {f"moe/layers/{key}": torch.stack(values).detach().float() for key, values in stats.items()}


def named_moe_metrics(metrics: dict, moe_layers: list[int]) -> dict:
    """`metrics` with each `moe/layers/<stat>` (`moe_metrics`' stack, averaged on the host) split into
    `moe/layer_03/<stat>`, the names logged (floats, the expert load a vector per layer), and each
    per-layer float's model-wide mean `moe/<stat>` over the MoE layers."""
    named = {}
    for key, value in metrics.items():
        if not key.startswith("moe/layers/"):
            named[key] = value
            continue
        stat = key.removeprefix("moe/layers/")
        rows = [row if row.dim() else row.item() for row in value]
        named.update({f"moe/layer_{layer:02d}/{stat}": row for layer, row in zip(moe_layers, rows, strict=True)})
        if value.dim() == 1:
            named[f"moe/{stat}"] = sum(rows) / len(rows)
    return named


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
