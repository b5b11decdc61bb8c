"""Evaluate a trained model: validation loss and the MoE sparsity metrics, reported to its MLflow run.

    python launch/eval.py RUN [--batches 16] [--batch-size 8]   # RUN: run id, run name, checkpoint or export dir

Runs in this process on one device (a GPU if there is one), with all experts local, whatever layout
trained the model. Metrics go to the run as `eval/loss`, `eval/moe/tls`, ... at the checkpoint's step.
"""

import math
from pathlib import Path

import torch

from sparta.platform.data import TokenBatches, open_corpus
from sparta.platform.lm import named_moe_metrics
from sparta.platform.runs import cli, load_model, read_config, resolve_cli
from sparta.platform.tracking import Tracker
from sparta.platform.worker import MetricSums


@torch.no_grad()
def evaluate(model_dir: Path, batches: int, batch_size: int) -> dict[str, float]:
    model, config = load_model(model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    corpus = open_corpus(Path(config["corpus_dir"]))
    val = TokenBatches(corpus.val, config["seq_len"], batch_size, rank=0, world_size=1, seed=0, shuffle=False)
    sums = MetricSums()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for index in range(min(batches, val.num_batches)):
            inputs, targets = val.get(index)
            _, metrics = model(inputs.to(device), targets.to(device))
            sums.add(metrics, 1.0)
    return {k: v for k, v in named_moe_metrics(sums.mean(all_ranks=False), model.moe_layers).items()
            if not isinstance(v, torch.Tensor)}  # the expert loads are plotted in training, not here


def main() -> None:
    parser = cli(__doc__, "MLflow run id, sparta run name, checkpoint or export directory")
    parser.add_argument("--batches", type=int, default=16, help="validation batches (fewer if the split is smaller)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    args = parser.parse_args()
    model_dir, run_id, uri = resolve_cli(args, "eval")
    metrics = evaluate(model_dir, args.batches, args.batch_size)
    print(f"[sparta] {model_dir}: validation loss {metrics['loss']:.4f} (ppl {math.exp(metrics['loss']):.1f})")
    for key in sorted(k for k in metrics if k.startswith("moe/") and not k.startswith("moe/layer_")):
        print(f"[sparta]   {key} {metrics[key]:.4f}")
    if run_id:
        config = read_config(model_dir)
        tracker = Tracker(config.get("tracking_uri") or uri, run_id)
        tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, config.get("step", 0))
        if tracker.enabled:
            print(f"[sparta] logged eval/* to MLflow run {run_id} at step {config.get('step', 0)}")


if __name__ == "__main__":
    main()
