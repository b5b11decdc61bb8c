"""Compare training runs recorded in MLflow: a side-by-side table and a 2x2 figure, kept as one new run.

    python launch/compare.py RUN [RUN ...]              # MLflow run ids or sparta run names (the sparta.run_name tag)
    python launch/compare.py 2026-12-05_10-00-00 2026-12-05_11-30-12 --out comparison/
    python launch/compare.py RUN RUN --tracking-uri http://mlflow:5000 --experiment comparisons

The store is the one `launch/train.py` writes to: --tracking-uri, else $MLFLOW_TRACKING_URI, else
sqlite:///<$SPARTA_ROOT or ./runs>/mlflow.db. comparison.png and comparison.md go to --out (default: a new
temporary folder) and are logged as the artifacts of a run tagged sparta.kind=comparison in the first
run's experiment (or --experiment). Exit code 2: a run, the experiment or the store was not found.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from sparta.platform.plots import ZERO_COMPUTATION_KEYS, compare_runs, save, zero_computation_fraction
from sparta.platform.runs import find_run
from sparta.platform.tracking import RUN_NAME_TAG, default_tracking_uri

METRICS = ("train/loss", "val/loss", "train/tokens_per_s", "train/grad_norm", "train/mfu", "moe/tls", "moe/cls8",
           "moe/ffn_experts_per_token", *ZERO_COMPUTATION_KEYS)
ROWS = {  # row of the table -> how its value prints
    "steps": "{:,.0f}",
    "final train/loss": "{:.4f}",
    "best val/loss": "{:.4f}",
    "final val/loss": "{:.4f}",
    "tokens/s (mean, last half)": "{:,.0f}",
    "final moe/tls": "{:.3f}",
    "final moe/cls8": "{:.3f}",
    "final moe/ffn_experts_per_token": "{:.2f}",
    "final ZC slot share": "{:.3f}",
    "final train/mfu": "{:.1%}",
}


def load_history(client, run) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The compared metrics, one value per step: a resumed run logs again the steps after its last
    checkpoint, and the later value is the one that counts."""
    history = {}
    for key in METRICS:
        if key in run.data.metrics:
            points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
            by_step = {point.step: point.value for point in points}
            history[key] = (np.array(list(by_step)), np.array(list(by_step.values())))
    return history


def summarize(history: dict) -> dict[str, float | None]:
    def final(key):
        return float(history[key][1][-1]) if key in history else None

    summary = dict.fromkeys(ROWS)
    if history:
        summary["steps"] = max(int(steps[-1]) for steps, _ in history.values())
    summary["final train/loss"] = final("train/loss")
    if "val/loss" in history:
        summary["best val/loss"] = float(history["val/loss"][1].min())
        summary["final val/loss"] = final("val/loss")
    if "train/tokens_per_s" in history:  # the first steps pay for start-up and warm-up: leave them out
        steps, values = history["train/tokens_per_s"]
        summary["tokens/s (mean, last half)"] = float(values[steps >= steps[-1] / 2].mean())
    summary["final moe/tls"] = final("moe/tls")
    summary["final moe/cls8"] = final("moe/cls8")
    summary["final moe/ffn_experts_per_token"] = final("moe/ffn_experts_per_token")
    zc = zero_computation_fraction(history)
    summary["final ZC slot share"] = float(zc[1][-1]) if zc is not None and len(zc[1]) else None
    summary["final train/mfu"] = final("train/mfu")
    return summary


def architecture(params: dict) -> str:
    """"router/moe" for an MoE FFN; a dense FFN has no router, whatever `choice.moe` says."""
    ffn = params.get("model.ffn", "?")
    return "dense" if ffn == "dense" else f"{params.get('choice.moe', '?')}/{ffn}"


def table_cells(summaries: list[dict]) -> list[list[str]]:
    return [[name] + ["n/a" if s[name] is None else ROWS[name].format(s[name]) for s in summaries] for name in ROWS]


def text_table(labels: list[str], cells: list[list[str]]) -> str:
    rows = [["", *labels], *cells]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))])
                     for row in rows)


def markdown_table(labels: list[str], cells: list[list[str]]) -> str:
    lines = ["| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"


def open_hint(uri: str, experiment_id: str, run_id: str) -> str:
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"open it: {uri.rstrip('/')}/{page}"
    return f"open it: mlflow ui --backend-store-uri {uri} --port 5000, then http://127.0.0.1:5000/{page}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_ID", help="MLflow run id or sparta run name")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local store)")
    parser.add_argument("--experiment", help="experiment to log the comparison run in (default: the first run's)")
    parser.add_argument("--out", type=Path, help="folder for comparison.png and comparison.md (default: a new temporary one)")
    args = parser.parse_args(argv)

    uri = default_tracking_uri(args.tracking_uri, Path(os.environ.get("SPARTA_ROOT", "runs")).resolve())
    # MLflow would create an empty store at a wrong path and then find no run in it.
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        print(f"compare: no MLflow store at {uri}; pass --tracking-uri or set MLFLOW_TRACKING_URI", file=sys.stderr)
        return 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = [find_run(client, ref) for ref in args.runs]
    missing = [ref for ref, run in zip(args.runs, runs) if run is None]
    if missing:
        print(f"compare: not found at {uri}: {', '.join(repr(ref) for ref in missing)} "
              f"(neither an MLflow run id nor a {RUN_NAME_TAG} tag)", file=sys.stderr)
        return 2
    experiment = client.get_experiment_by_name(args.experiment) if args.experiment else None
    if args.experiment and experiment is None:
        print(f"compare: experiment '{args.experiment}' not found at {uri}", file=sys.stderr)
        return 2

    names = [run.data.tags.get(RUN_NAME_TAG, run.info.run_name) for run in runs]
    labels = [f"{name} ({architecture(run.data.params)})" for name, run in zip(names, runs)]
    histories = [load_history(client, run) for run in runs]
    cells = table_cells([summarize(history) for history in histories])
    print(text_table(labels, cells))

    out = args.out or Path(tempfile.mkdtemp(prefix="sparta-compare-"))
    out.mkdir(parents=True, exist_ok=True)
    figure = save(compare_runs(histories, labels), out / "comparison.png")
    table = out / "comparison.md"
    table.write_text(markdown_table(labels, cells))
    print(f"\nwrote {figure} and {table}")

    experiment_id = experiment.experiment_id if experiment else runs[0].info.experiment_id
    ids = [run.info.run_id for run in runs]
    run_id = client.create_run(experiment_id, run_name="compare-" + "-".join(names),
                               tags={"sparta.kind": "comparison", "sparta.compared": ",".join(ids)}).info.run_id
    try:
        client.log_artifact(run_id, str(figure))
        client.log_artifact(run_id, str(table))
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    print(f"comparison run {run_id} in experiment '{client.get_experiment(experiment_id).name}' at {uri}")
    print(open_hint(uri, experiment_id, run_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
