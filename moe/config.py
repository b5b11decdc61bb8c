"""`MoEConfig`: every knob of an MoE layer, checked when it is built."""
import math
from dataclasses import dataclass

ROUTERS = ("topk", "blockffn", "moepp")
ACTIVATIONS = ("swiglu", "relu", "gelu", "silu")
SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass
class MoEConfig:
    """Configuration of one `MoE` layer. Fields are grouped by the router that reads them.

    Defaults of the BlockFFN and MoE++ groups are the papers' / reference code's (see
    `sparta.moe.routers`). The loss coefficients may be changed between steps (a trainer
    scheduling them, as BlockFFN's reference does for the chunk loss with
    `sparta.moe.ChunkSparsityScheduler`): the layer reads them at every forward.

    activation None picks the router's expert: "silu" (non-gated) for "blockffn", "swiglu" for
    "topk" and "moepp". BlockFFN's experts are non-gated SiLU FFNs, `W_out silu(W_in x)`: the
    reference's `BLockFeedForward` defaults to `ffn_activate_fn="silu", expert_gated=False`
    (thunlp/BlockFFN, pretrain/cpm/dragonfly/blockffn.py, lines 24-25), as does `DragonflyConfig`
    (pretrain/cpm/dragonfly/configuration_dragonfly.py, lines 34-36); the model configs
    (pretrain/apps/dragonfly_2b/model_configs/*_block.json) keep `"ffn_activate_fn": "silu"` and
    never gate, and every run passes `--ffn_activate_fn silu` (pretrain/entrance.sh). Ungated,
    `MoEUpDownExperts.forward` (pretrain/cpm/dragonfly/moe_modules.py) computes `act(x W_in)`.

    capacity_factor gamma (None = dropless): "topk" keeps ceil(gamma * T * k / E) slots per expert
    (GShard / Switch); "moepp" gives FFN and zero-computation experts the separate capacities of
    MoE++ (`expert_capacity`). Slots past an expert's capacity are dropped, first tokens first.
    """

    router: str = "topk"
    num_experts: int = 8                 # routed FFN experts (MoE++: zero-computation experts not included)
    top_k: int = 2                       # experts per token ("topk", "moepp"); unused by "blockffn"
    d_ff: int = 1024                     # hidden width of one FFN expert
    activation: str | None = None        # expert activation: "swiglu" | "relu" | "gelu" | "silu"; None: per router
    num_shared_experts: int = 0          # always-on experts (DeepSeekMoE), one dense FFN of that many d_ff
    capacity_factor: float | None = None  # None = dropless; else the slots an expert keeps (see `expert_capacity`)

    # "topk" (Switch / GShard / Mixtral / DeepSeek-V3)
    score_func: str = "softmax"          # "softmax" | "sigmoid"
    normalize_topk: bool = True          # renormalise the k selected scores to sum to 1
    load_balance_coef: float = 0.01      # also MoE++'s heterogeneous loss (beta = 0.01 in the paper)
    z_loss_coef: float = 1e-3            # ST-MoE router z-loss
    bias_update_rate: float = 0.0        # aux-loss-free balancing (DeepSeek-V3 uses 1e-3); 0 = off

    # "blockffn"
    locality_coef: float = 2e-3          # activation-locality loss weight (reference: transfer_lambda)
    locality_sharpness: float = 100.0    # alpha in sigmoid(alpha * score) (reference: sigmoid_steep)
    chunk_sparsity_coef: float = 5e-2    # chunk-sparsification loss weight (reference: chunk_regularization_factor)
    chunk_size: int = 64                 # chunk length of that loss (reference: chunk_regularization_length)
    router_norm_eps: float = 1e-5        # RMSNorm eps after the ReLU router

    # "moepp"
    num_zero_experts: int = 1
    num_copy_experts: int = 1
    num_constant_experts: int = 2
    tau: float = 0.75                    # weight of zero-computation experts in the load-balance loss and capacity
    gating_residual: bool = True         # add a learned map of the previous layer's router logits

    def __post_init__(self):
        _one_of("router", self.router, ROUTERS)
        if self.activation is None:
            self.activation = "silu" if self.router == "blockffn" else "swiglu"
        _one_of("activation", self.activation, ACTIVATIONS)
        _one_of("score_func", self.score_func, SCORE_FUNCS)
        for name in ("num_experts", "d_ff", "chunk_size"):
            _positive_int(name, getattr(self, name))
        for name in ("num_shared_experts", "num_zero_experts", "num_copy_experts", "num_constant_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"MoEConfig.{name} must be an int >= 0, got {value!r}")
        for name in ("load_balance_coef", "z_loss_coef", "bias_update_rate", "locality_coef",
                     "locality_sharpness", "chunk_sparsity_coef", "tau"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"MoEConfig.{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.router_norm_eps, (int, float)) and self.router_norm_eps > 0):
            raise ValueError(f"MoEConfig.router_norm_eps must be > 0, got {self.router_norm_eps!r}")
        if self.router != "blockffn":
            _positive_int("top_k", self.top_k)
            if self.top_k > self.total_experts:
                raise ValueError(f"MoEConfig.top_k={self.top_k} must be <= the {self.total_experts} experts a token "
                                 f"can choose from (num_experts"
                                 f"{' + zero-computation experts' if self.router == 'moepp' else ''})")
        if self.capacity_factor is not None:
            if self.router == "blockffn":
                raise ValueError("MoEConfig.capacity_factor must be None with router='blockffn' "
                                 "(a token uses a variable number of experts, BlockFFN is dropless)")
            if not (isinstance(self.capacity_factor, (int, float)) and self.capacity_factor > 0):
                raise ValueError(f"MoEConfig.capacity_factor must be None or > 0, got {self.capacity_factor!r}")
            if self.router == "moepp" and self.tau <= 0:
                raise ValueError(f"MoEConfig.tau must be > 0 with a capacity_factor (the FFN experts' capacity is "
                                 f"proportional to tau), got {self.tau!r}")
        if self.bias_update_rate > 0 and self.router != "topk":
            raise ValueError(f"MoEConfig.bias_update_rate (aux-loss-free balancing) is for router='topk', "
                             f"got router={self.router!r}")

    @property
    def num_zero_computation_experts(self) -> int:
        if self.router != "moepp":
            return 0
        return self.num_zero_experts + self.num_copy_experts + self.num_constant_experts

    @property
    def total_experts(self) -> int:
        """Experts the router scores: FFN experts plus (MoE++) zero-computation experts."""
        return self.num_experts + self.num_zero_computation_experts

    def expert_capacity(self, num_tokens: int) -> tuple[int, int]:
        """(slots an FFN expert keeps, slots a zero-computation expert keeps) for num_tokens tokens;
        needs capacity_factor. The second is 0 unless router="moepp".

        "topk": ceil(gamma * T * k / E), GShard / Switch. "moepp": MoE++ eq. 8 (Jin et al. 2024,
        arXiv:2410.07348, sec. 3.3), C_FFN = gamma * tau * T / (tau * N_FFN + N_ZC) and
        C_ZC = gamma * T / (tau * N_FFN + N_ZC), so that a zero-computation expert takes 1/tau times
        an FFN expert's tokens, as the heterogeneous load-balance loss asks (with tau = 1 and no
        zero-computation expert it is the top-k formula). There T counts the routed slots, T * k
        tokens' worth: MoE++ was trained with Megatron, whose capacity is
        get_capacity(num_tokens * topk, num_experts, capacity_factor). Rounded up, as both do.
        """
        if self.capacity_factor is None:
            raise ValueError("MoEConfig.expert_capacity needs a capacity_factor (None = dropless)")
        slots = self.capacity_factor * num_tokens * self.top_k
        if self.router != "moepp":
            return math.ceil(slots / self.num_experts), 0
        share = slots / (self.tau * self.num_experts + self.num_zero_computation_experts)
        return math.ceil(self.tau * share), math.ceil(share)


def _one_of(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"MoEConfig.{name} must be one of {allowed}, got {value!r}")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"MoEConfig.{name} must be an int >= 1, got {value!r}")
