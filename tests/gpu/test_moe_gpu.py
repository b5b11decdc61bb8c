"""MoE on CUDA: the bf16 fast path (Triton permute/activation kernels + torch._grouped_mm) against
the CPU fp32 layer (itself checked against a per-token loop in tests/test_moe_layer.py), and the
Triton kernels in bf16, which the CPU interpreter cannot check.

Tolerances (max abs error / max abs reference): bf16 layer 3e-2 output, 5e-2 gradients; bf16
kernels 1e-2; fp16 Triton grouped GEMM 2e-3.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from moe_cases import CONFIGS  # noqa: E402

from sparta.kernels.blockffn_router import blockffn_router_epilogue  # noqa: E402
from sparta.kernels.grouped_gemm import grouped_mm, torch_grouped_mm_supports  # noqa: E402
from sparta.kernels.moe_permute import permute, unpermute, weighted_activation  # noqa: E402
from sparta.kernels.moe_reference import grouped_mm_reference  # noqa: E402
from sparta.moe import MoE  # noqa: E402
from sparta.moe.losses import document_positions  # noqa: E402
from sparta.moe.metrics import routing_stats  # noqa: E402
from sparta.moe.routers import blockffn_router_epilogue_torch  # noqa: E402


def relative_error(actual, expected):
    return ((actual.float().cpu() - expected.float().cpu()).abs().max() / expected.float().abs().max()).item()


def test_bf16_uses_torch_grouped_mm_on_hopper():
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    if torch.cuda.get_device_capability() == (9, 0):
        assert torch_grouped_mm_supports(x, w)


@pytest.mark.parametrize("name, documents", [(name, False) for name in CONFIGS] + [("blockffn", True)])
def test_cuda_bf16_layer_matches_cpu_fp32(name, documents):
    torch.manual_seed(0)
    cpu = MoE(256, CONFIGS[name])
    gpu = MoE(256, CONFIGS[name]).cuda()
    gpu.load_state_dict(cpu.state_dict())
    gpu.experts.bfloat16()
    if gpu.shared is not None:
        gpu.shared.bfloat16()
    with torch.no_grad():  # the CPU reference gets the same bf16-rounded expert weights, in fp32
        for module in (cpu.experts, cpu.shared):
            if module is not None:
                for p in module.parameters():
                    p.copy_(p.bfloat16().float())
    x = torch.randn(2, 128, 256).bfloat16()
    x_cpu = x.float().requires_grad_()
    x_gpu = x.cuda().requires_grad_()
    doc_ids = (torch.rand(2, 128, generator=torch.Generator().manual_seed(1)) < 0.05).cumsum(1) if documents else None
    y_cpu, aux_cpu = cpu(x_cpu, doc_ids=doc_ids)
    y_gpu, aux_gpu = gpu(x_gpu, doc_ids=None if doc_ids is None else doc_ids.cuda())
    assert y_gpu.dtype == torch.bfloat16
    assert relative_error(y_gpu, y_cpu) < 3e-2
    assert aux_gpu.stats.keys() == aux_cpu.stats.keys()
    for key in ("tls", "cls8", "cls64", "dropped_fraction", "zc_dropped_fraction"):
        if key in aux_cpu.stats:
            assert aux_gpu.stats[key].item() == pytest.approx(aux_cpu.stats[key].item(), abs=1e-6), key
    for key, loss in aux_cpu.losses.items():
        assert aux_gpu.losses[key].item() == pytest.approx(loss.item(), rel=1e-4), key
    grad_out = torch.randn_like(y_cpu)
    (y_cpu * grad_out).sum().backward()
    (y_gpu.float() * grad_out.cuda()).sum().backward()
    assert relative_error(x_gpu.grad, x_cpu.grad) < 5e-2
    for (name_, p_gpu), p_cpu in zip(gpu.named_parameters(), cpu.parameters()):
        if p_cpu.grad is not None:
            assert relative_error(p_gpu.grad, p_cpu.grad) < 5e-2, name_


def test_triton_kernels_bf16():
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens, slots, width, d_ff = 1000, 4, 512, 384
    slot_expert = torch.randint(-1, 8, (tokens, slots), device="cuda", generator=g)
    flat = slot_expert.flatten()
    _, order = torch.sort(torch.where(flat >= 0, flat, 8), stable=True)
    rows = int((flat >= 0).sum())
    token_pos = torch.full((tokens * slots,), -1, dtype=torch.int32, device="cuda")
    token_pos[order[:rows]] = torch.arange(rows, dtype=torch.int32, device="cuda")
    token_pos = token_pos.view(tokens, slots)
    row_token = (order[:rows] // slots).to(torch.int32)
    x = torch.randn(tokens, width, device="cuda", generator=g).bfloat16()
    for use_triton in (True, False):
        x_in = x.clone().requires_grad_()
        rows_out = permute(x_in, row_token, token_pos, use_triton=use_triton)
        out = unpermute(rows_out * 0.5, row_token, token_pos, use_triton=use_triton)
        out.backward(torch.ones_like(out))
        if use_triton:
            fast = (out, x_in.grad)
        else:
            assert relative_error(fast[0], out) < 1e-2
            assert relative_error(fast[1], x_in.grad) < 1e-2
    for activation in ("swiglu", "relu", "gelu", "silu"):
        h = torch.randn(rows, 2 * d_ff if activation == "swiglu" else d_ff, device="cuda", generator=g).bfloat16()
        w = torch.rand(rows, device="cuda", generator=g)
        grad_a = torch.randn(rows, d_ff, device="cuda", generator=g).bfloat16()
        results = []
        for use_triton in (True, False):
            h_in, w_in = h.clone().requires_grad_(), w.clone().requires_grad_()
            a = weighted_activation(h_in, w_in, activation, use_triton=use_triton)
            a.backward(grad_a)
            results.append((a, h_in.grad, w_in.grad))
        for fast_t, ref_t in zip(*results):
            assert relative_error(fast_t, ref_t) < 1e-2, activation


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_grouped_mm_on_gpu(dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    counts = torch.tensor([300, 0, 1000, 5, 700], device="cuda")
    offs = counts.cumsum(0).to(torch.int32)
    x = torch.randn(int(counts.sum()), 512, device="cuda", generator=g).to(dtype).requires_grad_()
    w = torch.randn(5, 384, 512, device="cuda", generator=g).to(dtype).requires_grad_()
    grad_out = torch.randn(x.shape[0], 384, device="cuda", generator=g).to(dtype)
    out = grouped_mm(x, w.transpose(1, 2), offs, impl="triton")
    out.backward(grad_out)
    x_ref, w_ref = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = grouped_mm_reference(x_ref, w_ref.transpose(1, 2), offs)
    ref.backward(grad_out.float())
    tolerance = 2e-3 if dtype == torch.float16 else 1e-2
    assert relative_error(out, ref) < tolerance
    assert relative_error(x.grad, x_ref.grad) < tolerance
    assert relative_error(w.grad, w_ref.grad) < tolerance


@pytest.mark.parametrize("rate, documents", [(0.0625, False), (0.5, False), (0.0625, True)])
def test_blockffn_fused_router_and_stats_match_torch_at_16k_tokens(rate, documents):
    """The fused BlockFFN router epilogue (fp32 router scores, as the layer always computes them, whatever
    the model dtype) and the fused routing statistics against the torch formulas at the benchmark's size:
    2 sequences of 8192 tokens, E = 64, chunk 64; with documents, packed ones of ~300 tokens on average.
    Tolerance: 1e-5 relative (max abs error / max abs reference) on tensors and gradients, 1e-5 relative
    on the losses, 1e-6 absolute on the statistics."""
    g = torch.Generator(device="cuda").manual_seed(0)
    batch, seq, experts = 2, 8192, 64
    normal = torch.distributions.Normal(0.0, 1.0)
    raw = 0.05 * (torch.randn(batch * seq, experts, device="cuda", generator=g) - normal.icdf(torch.tensor(1 - rate)).item())
    norm_weight = 0.5 + torch.rand(experts, device="cuda", generator=g)
    doc_pos = None
    if documents:
        doc_pos = document_positions((torch.rand(batch, seq, device="cuda", generator=g) < 1 / 300).cumsum(1))
    options = dict(eps=1e-5, sharpness=100.0, chunk_size=64, locality_coef=2e-3, chunk_sparsity_coef=5e-2, doc_pos=doc_pos)
    grad_weights = torch.randn_like(raw)
    results = []
    for epilogue in (blockffn_router_epilogue, blockffn_router_epilogue_torch):
        raw_in, g_in = raw.clone().requires_grad_(), norm_weight.clone().requires_grad_()
        weights, probs, slot_expert, active, locality, chunk = epilogue(raw_in, g_in, (batch, seq), **options)
        ((weights * grad_weights).sum() + locality + chunk).backward()
        results.append((weights, probs, slot_expert, active, locality, chunk, raw_in.grad, g_in.grad))
    fused, reference = results
    assert torch.equal(fused[2], reference[2]) and torch.equal(fused[3], reference[3])
    for index, name in ((0, "weights"), (1, "probs"), (6, "d_raw"), (7, "d_g")):
        assert relative_error(fused[index], reference[index]) < 1e-5, name
    for index, name in ((4, "locality"), (5, "chunk")):
        assert fused[index].item() == pytest.approx(reference[index].item(), rel=1e-5), name
    active, probs = fused[3].view(batch, seq, experts), fused[1]
    stats = routing_stats(active, probs, doc_pos)
    expected = routing_stats(active.cpu(), probs.cpu(), None if doc_pos is None else doc_pos.cpu())
    for key, value in expected.items():
        torch.testing.assert_close(stats[key].cpu(), value, rtol=0, atol=1e-6, msg=key)
