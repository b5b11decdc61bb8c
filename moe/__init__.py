"""Mixture-of-Experts FFN layers: top-k, BlockFFN and MoE++ routers over dropless grouped experts.

    from sparta.moe import MoE, MoEConfig
    layer = MoE(d_model, MoEConfig(router="moepp", num_experts=16, top_k=2, d_ff=1024))
    y, aux = layer(x)                      # x [batch, seq, d_model]
    loss = task_loss + aux.loss            # aux.stats: TLS, CLS, entropy, ... (see MoEAux)
"""
from .config import MoEConfig
from .layer import MoE, MoEAux
from .metrics import CLS_CHUNK_SIZES

__all__ = ["MoE", "MoEAux", "MoEConfig", "CLS_CHUNK_SIZES"]
