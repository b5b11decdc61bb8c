"""Mixture-of-Experts FFN layers: top-k, BlockFFN and MoE++ routers over grouped experts.

    from sparta.moe import MoE, MoEConfig
    layer = MoE(d_model, MoEConfig(router="moepp", num_experts=16, top_k=2, d_ff=1024))
    y, aux = layer(x, doc_ids=doc_ids)     # x [batch, seq, d_model]; doc_ids [batch, seq] or None
    loss = task_loss + aux.loss            # aux.stats: TLS, CLS, entropy, ... (see MoEAux)

`ChunkSparsityScheduler` adapts BlockFFN's chunk-sparsification weight during training, as its
reference does; `load_summary` condenses `aux.expert_load` into max / min / coefficient of variation.
"""
from .config import MoEConfig
from .layer import MoE, MoEAux
from .metrics import CLS_CHUNK_SIZES, load_summary
from .schedule import ChunkSparsityScheduler

__all__ = ["MoE", "MoEAux", "MoEConfig", "CLS_CHUNK_SIZES", "ChunkSparsityScheduler", "load_summary"]
