"""The model families that one trainer trains: a config dataclass and a module per family.

Every family keeps the trainer's contract (`platform/lm.py`): built from its config (and the
expert- and sequence-parallel groups), `model(inputs, targets) -> (loss, metrics)`, `model(inputs) -> logits`,
`model.flops_per_token(seq_len, experts_per_token)`. `model.family` in the config picks one.
"""

from sparta.moe import MoEConfig
from sparta.platform.dlm import DiffusionLM, DLMConfig
from sparta.platform.lm import LMConfig, TransformerLM
from sparta.platform.vdit import VDiTConfig, VideoDiT

FAMILIES = {"lm": (LMConfig, TransformerLM), "dlm": (DLMConfig, DiffusionLM), "vdit": (VDiTConfig, VideoDiT)}


def build_model(cfg: LMConfig | VDiTConfig, ep_group=None, sp_group=None) -> TransformerLM | DiffusionLM | VideoDiT:
    return FAMILIES[cfg.family][1](cfg, ep_group, sp_group)


def config_from_dict(values: dict) -> LMConfig | VDiTConfig:
    """A model config saved with `dataclasses.asdict` (checkpoints, exports); no family: the LM's."""
    values = dict(values)
    if values.get("moe") is not None:
        values["moe"] = MoEConfig(**values["moe"])
    return FAMILIES[values.get("family", "lm")][0](**values)
