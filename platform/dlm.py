"""A masked diffusion language model (LLaDA: Nie et al., 2025) and its sampler, with SparseD attention.

Training corrupts each clean sequence x0 by the forward process: draw t ~ U(0, 1) per sequence and
replace each token by [MASK] with probability t. The bidirectional transformer predicts every masked
token from the rest, and the loss, cross-entropy on the masked positions weighted by 1/t and averaged
per token, is an upper bound on the negative log-likelihood per token (the ELBO), comparable to the
autoregressive LM's loss. With `prompt_prob`, a share of the sequences keeps a random-length prefix
clean (a prompt, never masked), so that the model learns to continue a prompt.

Sampling (`generate`) starts the answer all [MASK] and runs T denoising steps: each step predicts
every masked token and keeps the most confident predictions (LLaDA's low-confidence remasking),
block by block from left to right (semi-autoregressive decoding). The attention of every layer is a
`sparta.attention.SparseAttention`: dense SDPA in training and by default, and for SparseD the
`SparseDSchedule` layout provider with the Triton block-sparse kernel (`use_attention`).

The vocabulary is the tokenizer's ids 0 .. vocab_size-1; the model adds [MASK] as id vocab_size
(one more embedding row) and never predicts it.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sparta.attention import SparseAttention, SparseDSchedule
from sparta.kernels.block_layout import SUPPORTED_BLOCK_SIZES
from sparta.kernels.block_sparse_attention import SUPPORTED_HEAD_DIMS
from sparta.platform.lm import Block, LMConfig, TransformerLM, document_ids, run_blocks, shard_or_none, with_aux_losses
from sparta.platform.noise import NoiseStreams

MASK_EPS = 1e-3  # t is drawn in [MASK_EPS, 1], as LLaDA does, so that 1/t stays bounded
ATTENTION_KINDS = ("dense", "sparsed")
BACKENDS = ("auto", "triton", "reference")


@dataclass
class DLMConfig(LMConfig):
    family: str = "dlm"
    prompt_prob: float = 0.0  # share of training sequences whose random-length prefix stays clean (a prompt)

    def __post_init__(self):
        if not 0.0 <= self.prompt_prob <= 1.0:
            raise ValueError(f"model.prompt_prob={self.prompt_prob!r}: expected in [0, 1]")

    @property
    def mask_id(self) -> int:
        return self.vocab_size


class DiffusionLM(nn.Module):
    """The LM's blocks (RMSNorm, SwiGLU or MoE FFN) with bidirectional `SparseAttention` (1-D rotary).

    The trainer's contract: `model(tokens, targets)` returns `(loss, metrics)`, the diffusion bound on
    the window `tokens` (the clean sequence; the next-token `targets` only ask for the loss);
    `model(tokens)` returns the logits over the vocabulary (without [MASK]).

    With a sequence-parallel group (training only), every rank of the group draws the same noise for
    the whole sequences and runs its own shard; its loss is the shard's sum over masked tokens (per
    answer token of the whole sequence) times the group size, so that the group's mean is the bound.
    """

    def __init__(self, cfg: DLMConfig, ep_group=None, sp_group=None):
        super().__init__()
        self.cfg = cfg
        self.sp_group = sp_group
        init_seed = int(torch.randint(0, 2**62, ()))  # before the layers draw their own (layout-dependent) inits
        self.embed = nn.Embedding(cfg.vocab_size + 1, cfg.d_model)  # + [MASK]
        self.blocks = nn.ModuleList(
            Block(cfg, layer, ep_group, SparseAttention(cfg.d_model, cfg.n_heads, num_kv_heads=cfg.n_kv_heads,
                                                        rotary="1d", max_tokens=cfg.max_seq_len,
                                                        rotary_base=cfg.rope_theta, layer=layer, sequence_group=sp_group))
            for layer in range(cfg.n_layers))
        self.moe_layers = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size + 1, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self._init_weights(init_seed, ep_group)
        self.noise = NoiseStreams(sp_group)

    # The LM's layout-independent init and its FLOPs count hold unchanged (its attention term already
    # counts the full square that bidirectional attention computes).
    _init_weights = TransformerLM._init_weights
    flops_per_token = TransformerLM.flops_per_token

    @property
    def mask_id(self) -> int:
        return self.cfg.mask_id

    def train(self, mode: bool = True):
        self.noise.restart_eval()
        return super().train(mode)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        if targets is None:
            return self.logits(tokens)
        return self.diffusion_loss(tokens)

    def hidden(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None):
        """The final normed hidden states `[batch, seq, d_model]` and the MoE layers' aux outputs."""
        self.cfg.check_seq_len(tokens)
        if doc_ids is None and self.moe_layers and self.cfg.eot_id is not None:
            doc_ids = document_ids(tokens, self.cfg.eot_id)
        x, auxes = run_blocks(self.blocks, self.embed(tokens), doc_ids)
        return self.norm(x), auxes

    def logits(self, tokens: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Logits `[batch, end - start, vocab_size]` of positions start..end-1 (the sampler needs one block's)."""
        hidden, _ = self.hidden(tokens)
        return self.head(hidden[:, start:end])[..., :self.cfg.vocab_size]

    def diffusion_loss(self, clean: torch.Tensor) -> tuple[torch.Tensor, dict]:
        noise = self.noise.next(self.training, clean.device)
        prompt_len = draw_prompt_lengths(clean.shape, self.cfg.prompt_prob, noise, clean.device)
        noisy, masked, p_mask = mask_tokens(clean, self.mask_id, prompt_len, noise)
        doc_ids = document_ids(clean, self.cfg.eot_id) if self.moe_layers and self.cfg.eot_id is not None else None
        answer_len, shards = clean.shape[1] - prompt_len, 1
        if self.sp_group is not None:
            clean, noisy, masked, doc_ids = (shard_or_none(t, self.sp_group) for t in (clean, noisy, masked, doc_ids))
            shards = dist.get_world_size(self.sp_group)
        hidden, auxes = self.hidden(noisy, doc_ids)
        logits = self.head(hidden)[..., :self.cfg.vocab_size]
        loss = shards * elbo_loss(logits, clean, masked, p_mask, answer_len)
        return with_aux_losses(loss, auxes, self.cfg.moe)


def draw_prompt_lengths(shape: torch.Size, prompt_prob: float, generator: torch.Generator,
                        device: torch.device) -> torch.Tensor:
    """Per sequence, with probability `prompt_prob` a prompt of 1 .. seq-1 tokens, else none (0)."""
    batch, seq = shape
    lengths = torch.randint(1, max(seq, 2), (batch,), generator=generator, device=device)
    has_prompt = torch.rand(batch, generator=generator, device=device) < prompt_prob
    return torch.where(has_prompt, lengths, 0)


def mask_tokens(clean: torch.Tensor, mask_id: int, prompt_len: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward process: per sequence t ~ U(MASK_EPS, 1), each token after the prompt masked with
    probability t. Returns the noisy tokens, the bool mask of masked positions and t `[batch]`."""
    batch, seq = clean.shape
    t = MASK_EPS + (1 - MASK_EPS) * torch.rand(batch, generator=generator, device=clean.device)
    answer = torch.arange(seq, device=clean.device)[None, :] >= prompt_len[:, None]
    masked = answer & (torch.rand(batch, seq, generator=generator, device=clean.device) < t[:, None])
    return torch.where(masked, mask_id, clean), masked, t


def elbo_loss(logits: torch.Tensor, clean: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
              answer_len: torch.Tensor) -> torch.Tensor:
    """Per sequence: sum over its masked positions of cross-entropy / t, divided by its answer
    length (the tokens that could be masked); the mean over the batch. In expectation over the
    masks, t and the data: an upper bound on the NLL per answer token."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), clean.flatten(), reduction="none").view_as(clean)
    per_sequence = (ce * masked).sum(dim=1) / t / answer_len.clamp(min=1)
    return per_sequence.mean()


# ---- sampling -------------------------------------------------------------------------------------

@dataclass
class SparseDConfig:
    skip_ratio: float = 0.2           # dense attention for the first skip_ratio of the steps
    # key blocks kept per query block, prompt and answer apart; null: SparseD's (0.3 from 4k tokens, else 0.5)
    keep_ratio: float | None = None
    block: int = 128                  # block size of the masks: 16, 32, 64 or 128


@dataclass
class SamplerConfig:
    gen_len: int = 128                # answer tokens
    steps: int = 128                  # denoising steps T, split evenly over the blocks
    block_len: int = 32               # semi-autoregressive blocks of the answer, decoded left to right
    temperature: float = 0.0          # 0: argmax; > 0: Gumbel-max draws at this temperature
    seed: int = 0                     # the draws (temperature > 0): dense and sparsed runs of one seed see the same
    attention: str = "dense"          # dense (SDPA; cuDNN first on GPUs) | sparsed (SparseD)
    backend: str = "auto"             # sparsed's kernel: auto (triton on GPUs, reference on CPU) | triton | reference
    sparsed: SparseDConfig = field(default_factory=SparseDConfig)


def check_sampler(sampler: SamplerConfig, model_cfg: DLMConfig, prompt_len: int, device: torch.device) -> str:
    """Refuse settings the model cannot run, naming the key; returns the attention backend to use."""
    s, sparsed = sampler, sampler.sparsed
    context = prompt_len + s.gen_len
    head_dim = model_cfg.d_model // model_cfg.n_heads
    backend = ("triton" if device.type == "cuda" else "reference") if s.backend == "auto" else s.backend
    if context > model_cfg.max_seq_len:
        raise ValueError(f"prompt: {prompt_len} tokens + gen_len={s.gen_len} exceed the context, "
                         f"model.max_seq_len={model_cfg.max_seq_len}")
    checks = [
        (s.gen_len >= 1, "gen_len", ">= 1", s.gen_len),
        (s.block_len >= 1 and s.gen_len % s.block_len == 0, "block_len", f"a divisor of gen_len={s.gen_len}", s.block_len),
        (s.steps >= 1 and s.steps % max(1, s.gen_len // max(1, s.block_len)) == 0, "steps",
         f"a positive multiple of the {s.gen_len // max(1, s.block_len)} blocks (gen_len / block_len)", s.steps),
        (s.temperature >= 0, "temperature", ">= 0", s.temperature),
        (s.attention in ATTENTION_KINDS, "attention", f"one of {', '.join(ATTENTION_KINDS)}", s.attention),
        (s.backend in BACKENDS, "backend", f"one of {', '.join(BACKENDS)}", s.backend),
        (0 <= sparsed.skip_ratio <= 1, "sparsed.skip_ratio", "in [0, 1]", sparsed.skip_ratio),
        (sparsed.keep_ratio is None or 0 < sparsed.keep_ratio <= 1, "sparsed.keep_ratio", "null or in (0, 1]",
         sparsed.keep_ratio),
        (sparsed.block in SUPPORTED_BLOCK_SIZES, "sparsed.block", f"one of {', '.join(map(str, SUPPORTED_BLOCK_SIZES))}",
         sparsed.block),
    ]
    if s.attention == "sparsed" and backend == "triton":
        checks += [
            (device.type == "cuda", "backend", "reference on a machine without a GPU (the Triton kernels run on CUDA)",
             s.backend),
            (head_dim in SUPPORTED_HEAD_DIMS, "attention",
             f"dense, or backend=reference: the Triton kernels take head dims {SUPPORTED_HEAD_DIMS}, this model's is "
             f"{head_dim} (model.d_model / model.n_heads)", s.attention),
        ]
    for ok, key, expected, got in checks:
        if not ok:
            raise ValueError(f"{key}={got!r}: expected {expected}")
    return backend


def use_attention(model: nn.Module, provider, backend: str) -> None:
    """Every layer's attention from now on (a model whose blocks attend through `SparseAttention`: the
    diffusion LM, the video DiT): `provider` None is dense SDPA, else a layout provider (a
    `SparseDSchedule`, a `Plan`) run by `backend` ("triton" or "reference")."""
    for block in model.blocks:
        block.attention.core.layout, block.attention.core.backend = provider, backend


def sparsed_schedule(sampler: SamplerConfig, prompt_len: int) -> SparseDSchedule:
    """A fresh schedule for one `generate` call (it caches the masks of one prompt)."""
    s = sampler.sparsed
    return SparseDSchedule(sampler.steps, skip_ratio=s.skip_ratio, keep_ratio=s.keep_ratio, block=s.block,
                           prompt_len=prompt_len)


@torch.no_grad()
def generate(model: DiffusionLM, prompt: torch.Tensor, sampler: SamplerConfig,
             schedule: SparseDSchedule | None = None, on_step=None) -> torch.Tensor:
    """LLaDA's sampler: the answer tokens `[batch, gen_len]` continuing `prompt` `[batch, prompt_len]`.

    The answer starts all [MASK]. Its blocks of `block_len` are decoded left to right, each in
    steps / (gen_len / block_len) steps; a step predicts the block's masked tokens and unmasks as
    many of the most confident as that step's share (low-confidence remasking: the rest stay
    masked). `schedule` (SparseD) is told the step before every model call; `on_step(step)` runs after.
    """
    batch, prompt_len = prompt.shape
    x = torch.cat([prompt, prompt.new_full((batch, sampler.gen_len), model.mask_id)], dim=1)
    generator = torch.Generator(prompt.device).manual_seed(sampler.seed)
    steps_per_block = sampler.steps // (sampler.gen_len // sampler.block_len)
    step = 0
    for start in range(prompt_len, prompt_len + sampler.gen_len, sampler.block_len):
        end = start + sampler.block_len
        counts = transfer_counts((x[:, start:end] == model.mask_id).sum(dim=1), steps_per_block)
        for i in range(steps_per_block):
            if schedule is not None:
                schedule.step = step
            prediction, confidence = predict(model.logits(x, start, end), sampler.temperature, generator)
            x[:, start:end] = unmask_most_confident(x[:, start:end], prediction, confidence, counts[:, i], model.mask_id)
            if on_step is not None:
                on_step(step)
            step += 1
    return x[:, prompt_len:]


def transfer_counts(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """How many tokens each of `steps` steps unmasks `[batch, steps]`: as even as possible, the
    remainder to the first steps (LLaDA's schedule, linear in t)."""
    base, remainder = masked // steps, masked % steps
    return base[:, None] + (torch.arange(steps, device=masked.device)[None, :] < remainder[:, None])


def predict(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's token (argmax, or a Gumbel-max draw at `temperature`) and the model's
    probability of it: the confidence that remasking ranks by."""
    logits = logits.float()
    if temperature > 0:
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(min=1e-20)
        prediction = (logits / temperature - torch.log(-torch.log(uniform))).argmax(dim=-1)
    else:
        prediction = logits.argmax(dim=-1)
    return prediction, logits.softmax(dim=-1).gather(-1, prediction[..., None]).squeeze(-1)


def unmask_most_confident(block: torch.Tensor, prediction: torch.Tensor, confidence: torch.Tensor,
                          count: torch.Tensor, mask_id: int) -> torch.Tensor:
    """`block` with, per row, its `count` most confident masked positions set to their prediction."""
    masked = block == mask_id
    rank = confidence.masked_fill(~masked, -math.inf).argsort(dim=1, descending=True).argsort(dim=1)  # 0: most confident
    return torch.where(masked & (rank < count[:, None]), prediction, block)
