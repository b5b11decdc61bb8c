"""Block-sparse attention: layouts, video and diffusion-LM patterns, pattern search, modules."""

from sparta.attention.layout import BlockLayout, HeadGroup, TokenOrder, invert_permutation
from sparta.attention.module import SparseAttention, SparseAttentionCore, attend, masked_attention
from sparta.attention.search import (
    CostModel,
    PatternSearch,
    Plan,
    calibration_error,
    capture_qkv,
    video_candidates,
)
from sparta.attention.selection import (
    DynamicBlockSelection,
    attention_block_mass,
    mass_blocks,
    pool_blocks,
    pooled_block_logits,
    topk_blocks,
)
from sparta.attention.sequence_parallel import heads_to_sequence, sequence_gather, sequence_shard, sequence_to_heads
from sparta.attention.sparsed import SparseDSchedule
from sparta.attention.video import PATTERNS, Pattern, TileOrder, VideoGrid

__all__ = [
    "PATTERNS", "BlockLayout", "CostModel", "DynamicBlockSelection", "HeadGroup", "Pattern", "PatternSearch",
    "Plan", "SparseAttention", "SparseAttentionCore", "SparseDSchedule", "TileOrder", "TokenOrder", "VideoGrid",
    "attend", "attention_block_mass", "calibration_error", "capture_qkv", "heads_to_sequence", "invert_permutation",
    "masked_attention", "mass_blocks", "pool_blocks", "pooled_block_logits", "sequence_gather", "sequence_shard",
    "sequence_to_heads", "topk_blocks", "video_candidates",
]
