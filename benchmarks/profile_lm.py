"""Where a training step of an LM experiment goes: the model's forward + backward alone (bf16 weights,
no Ray, no DeepSpeed, no optimizer), its tokens/s and MFU, and the CUDA kernels and CPU ops that take
the time. The gap between this and `launch/train.py`'s tokens/s is the trainer's share.

    python benchmarks/profile_lm.py experiment=lm_topk moe.top_k=5 [--steps 20] [--compile [--mode M]] [--out DIR]

Tokens are random ids (the vocabulary size is `data.vocab_size`, no corpus is read); the end-of-text
id 0 appears in them, so the MoE layers see packed documents as in training. Prints the measured
speed, then `trainer.profile_steps`'s profiler over 3 more steps: the GPU's busy share of the wall
time and the top ops by GPU and by host time; with --out, the tables and a Chrome trace stay in DIR/<overrides>.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sparta.platform.config import JobConfig
from sparta.platform.lm import TransformerLM
from sparta.platform.profiling import StepProfiler
from sparta.platform.worker import peak_tflops

REPO = Path(__file__).resolve().parents[1]


def build(overrides: list[str]) -> tuple[TransformerLM, JobConfig]:
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    job = JobConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
    model = TransformerLM(job.model_config(job.data.vocab_size, eot_id=0))
    return model.cuda().to(torch.bfloat16), job


def step(model: TransformerLM, inputs: torch.Tensor, targets: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)  # as an optimizer step would: CUDA graphs reuse their output buffers
    torch.compiler.cudagraph_mark_step_begin()
    loss, metrics = model(inputs, targets)
    loss.backward()
    return metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for launch/train.py")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 5 warm-up steps)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compiled in the warm-up)")
    parser.add_argument("--mode", default=None, help="torch.compile mode (e.g. reduce-overhead: CUDA graphs)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the tables and the trace")
    args = parser.parse_args()
    model, job = build(args.overrides)
    if args.compile:
        model.compile(mode=args.mode)
    batch, seq = job.deepspeed.micro_batch_size, job.data.seq_len
    inputs = torch.randint(0, job.data.vocab_size, (batch, seq + 1), device="cuda")
    inputs, targets = inputs[:, :-1], inputs[:, 1:]

    for _ in range(5):
        metrics = step(model, inputs, targets)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        metrics = step(model, inputs, targets)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    experts = dict(zip(model.moe_layers, metrics["moe/layers/ffn_experts_per_token"].tolist()))
    flops = model.flops_per_token(seq, experts) * batch * seq
    peak = peak_tflops(None, use_gpu=True)
    name = " ".join(args.overrides) + (f" (compiled, mode {args.mode or 'default'})" if args.compile else "")
    print(f"{name}: {seconds * 1e3:.1f} ms/step, {batch * seq / seconds:,.0f} tokens/s, "
          f"{flops / seconds / 1e12:.1f} TFLOP/s" + (f", MFU {flops / seconds / 1e12 / peak:.1%}" if peak else ""))

    slug = "-".join(o.replace("=", "_").replace("/", "_") for o in args.overrides)
    slug += ("-compiled" if args.compile else "") + (f"-{args.mode}" if args.mode else "")
    profiler = StepProfiler((1, 3), use_gpu=True, out_dir=(args.out or Path(tempfile.mkdtemp())) / slug)
    for index in range(1, 4):
        profiler.step_begins(index)
        step(model, inputs, targets)
        profiled = profiler.step_ends(index)
    print(profiled[1][0].read_text())
    if args.out:
        print(f"tables and Chrome trace: {', '.join(str(f) for f in profiled[1])}")

if __name__ == "__main__":
    main()
