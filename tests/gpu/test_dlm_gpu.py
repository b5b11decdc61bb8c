"""The masked diffusion LM on a GPU: SparseD through the Triton kernels against dense cuDNN SDPA, and the
smoke experiment trained through launch/train.py then sampled with launch/generate.py (SparseD, Triton)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparta.platform.dlm import DiffusionLM, DLMConfig, SamplerConfig, SparseDConfig, generate, sparsed_schedule, use_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
REPO = Path(__file__).resolve().parents[2]


def test_sparsed_keeping_every_block_matches_dense_in_bf16():
    torch.manual_seed(0)
    cfg = DLMConfig(vocab_size=512, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=512, max_seq_len=2048)
    model = DiffusionLM(cfg).to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, 512, (2, 1920), device="cuda")
    sampler = SamplerConfig(gen_len=128, steps=32, block_len=32, attention="sparsed",
                            sparsed=SparseDConfig(skip_ratio=0.25, keep_ratio=1.0, block=64))
    dense = generate(model, prompt, sampler)
    x = torch.cat([prompt, dense], dim=1)
    dense_logits = model.logits(x).float()
    schedule = sparsed_schedule(sampler, 1920)
    use_attention(model, schedule, "triton")
    sparse = generate(model, prompt, sampler, schedule)
    assert (sparse == dense).float().mean() >= 0.95  # bf16 rounding may flip a near tie
    assert (model.logits(x).float() - dense_logits).abs().max() < 0.1

    sampler.sparsed.keep_ratio = 0.3
    schedule = sparsed_schedule(sampler, 1920)
    use_attention(model, schedule, "triton")
    answer = generate(model, prompt, sampler, schedule)
    assert answer.shape == (2, 128) and (answer != model.mask_id).all()


def test_dlm_smoke_trains_on_the_gpu_and_samples_with_the_triton_kernels(tmp_path):
    from mlflow.tracking import MlflowClient

    train = [sys.executable, str(REPO / "launch" / "train.py"), "experiment=dlm_smoke", f"cluster.root={tmp_path}",
             "run_name=dlm", "trainer.max_steps=60", "trainer.eval_every=20", "trainer.checkpoint_every=60"]
    proc = subprocess.run(train, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, "launch/generate.py", "dlm", "--tracking-uri", uri, "prompt_tokens=48",
                           "gen_len=16", "block_len=8", "steps=8", "samples=4", "attention=sparsed", "sparsed.block=16",
                           "sparsed.keep_ratio=0.5"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("sparta").experiment_id])[0]
    val = sorted(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)
    assert val[-1].value < val[0].value
    metrics = run.data.metrics
    assert metrics["generate/sparsed/block_fraction"] < 1 and metrics["generate/sparsed/agreement"] >= 0.5
