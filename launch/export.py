"""Export a trained model: one consolidated safetensors file (all experts, fp32), its config and tokenizer.

    python launch/export.py RUN [--out DIR]      # RUN: MLflow run id, sparta run name, or checkpoint directory

The export loads anywhere with `sparta.platform.runs.load_model(DIR)` (and `launch/eval.py DIR`),
whatever expert-parallel layout trained it.
"""

import json
import shutil
from pathlib import Path

from sparta.platform.checkpoint import MODEL_FILE
from sparta.platform.data import TOKENIZER_FILE
from sparta.platform.runs import EXPORT_CONFIG, cli, read_config, resolve_cli
from sparta.platform.tracking import Tracker


def export(model_dir: Path, out: Path) -> Path:
    config = read_config(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_dir / MODEL_FILE, out / MODEL_FILE)
    if not config.get("video_data"):  # token models need their tokenizer; video models have none
        shutil.copyfile(Path(config["corpus_dir"]) / TOKENIZER_FILE, out / TOKENIZER_FILE)
    keep = ("model_config", "corpus_dir", "seq_len", "video_data", "mlflow_run_id", "tracking_uri", "step")
    (out / EXPORT_CONFIG).write_text(json.dumps({**{k: config.get(k) for k in keep}, "source": str(model_dir)}, indent=1))
    return out


def main() -> None:
    parser = cli(__doc__, "MLflow run id, sparta run name, or a checkpoint directory")
    parser.add_argument("--out", type=Path, help="output directory (default: exports/<checkpoint name>)")
    args = parser.parse_args()
    model_dir, run_id, uri = resolve_cli(args, "export")
    out = export(model_dir, args.out or Path("exports") / f"{model_dir.parent.name}-{model_dir.name}")
    if run_id:
        Tracker(read_config(model_dir).get("tracking_uri") or uri, run_id).set_tags({"sparta.export": str(out.resolve())})
    print(f"[sparta] exported {model_dir} -> {out.resolve()} ({MODEL_FILE}, {EXPORT_CONFIG}, {TOKENIZER_FILE})")


if __name__ == "__main__":
    main()
