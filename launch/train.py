"""Train a sparta model: Hydra composes the config, Ray Train runs DeepSpeed workers, MLflow records.

    python launch/train.py                                   # embedded default: local Ray, CPU or GPUs found
    python launch/train.py experiment=smoke deepspeed=zero1  # pick config groups, override keys
    python launch/train.py --cfg job                         # print the composed config
    python launch/train.py -m deepspeed.optimizer.lr=1e-3,3e-3   # sweep
    ray job submit --working-dir . -- python launch/train.py cluster=ray   # on a Ray cluster
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sparta.platform.config import ConfigError, JobConfig


def writable_root(path: str) -> str:
    """`${sparta.root:${cluster.root}}`: Hydra writes its logs under cluster.root before `main` runs, so
    a root that cannot be created is reported here, as a config error naming the key."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"config error: cluster.root={path!r}: cannot create it ({error.strerror}); expected a writable directory",
              file=sys.stderr)
        sys.exit(2)
    return path


OmegaConf.register_new_resolver("sparta.root", writable_root)


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
        job = JobConfig.from_dict(tree)
        from sparta.platform import job as driver  # Ray/DeepSpeed imports only once the config is valid

        params = {**flatten(tree),
                  **{f"choice.{group}": option for group, option in hydra_cfg.runtime.choices.items()
                     if not group.startswith("hydra") and option is not None}}
        result = driver.run(job, default_run_name(hydra_cfg), params, OmegaConf.to_yaml(cfg, resolve=True))
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(2)
    return result.val_loss  # the objective a Hydra sweeper minimises


def default_run_name(hydra_cfg) -> str:
    """The Hydra output directory's own name: the launch time, plus the job number inside a sweep."""
    output = Path(hydra_cfg.runtime.output_dir)
    return f"{output.parent.name}-{output.name}" if output.parent.name.startswith("multirun") else output.name


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


if __name__ == "__main__":
    main()
