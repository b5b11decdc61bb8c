"""Hydra composition and the checks that run before any worker starts."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sparta.platform.config import ConfigError, JobConfig, deepspeed_config
from sparta.platform.job import find_init_checkpoint, plan_workers

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def compose_tree(*overrides: str) -> dict:
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=list(overrides)), resolve=True)


def compose_job(*overrides: str) -> JobConfig:
    return JobConfig.from_dict(compose_tree(*overrides))


def test_default_and_every_group_option_compose_and_validate():
    job = compose_job()
    assert job.deepspeed.zero_stage == 2 and job.cluster.name == "local" and job.model["d_model"] == 128
    video = {"vdit_tiny": "data=procedural_video", "procedural_video": "model=vdit_tiny"}  # each needs the other
    for group in ("model", "moe", "data", "trainer", "deepspeed", "cluster", "experiment"):
        for option in sorted((CONFIGS / group).glob("*.yaml")):
            compose_job(f"{group}={option.stem}", *([video[option.stem]] if option.stem in video else []))
    small_gpu = compose_job("experiment=small_gpu")
    assert small_gpu.model["d_model"] == 512 and small_gpu.data.seq_len == 512


def test_zero_stage_options_set_the_stage():
    for stage in range(4):
        assert compose_job(f"deepspeed=zero{stage}").deepspeed.zero_stage == stage


@pytest.mark.parametrize("override, message", [
    ("deepspeed.optimizer.lr=-1", r"deepspeed.optimizer.lr=-1.0: expected > 0"),
    ("deepspeed.zero_stage=7", r"deepspeed.zero_stage=7: expected one of 0, 1, 2, 3"),
    ("deepspeed.precision=fp8", r"deepspeed.precision='fp8': expected one of auto, bf16, fp16, fp32"),
    ("deepspeed.optimizer.name=lion", r"deepspeed.optimizer.name='lion': expected one of adamw, adam"),
    ("trainer.max_steps=abc", r"trainer.max_steps='abc': expected an integer"),
    ("trainer.use_gpu=3", r"trainer.use_gpu=3: expected true/false or null"),
    ("+trainer.lrr=1", r"trainer.lrr: unknown key; allowed keys under trainer: num_workers, .*seed"),
    ("+model.vocab_size=10", r"model.vocab_size: unknown key \(it is set by the tokenizer\)"),
    ("model.n_heads=3", r"model.n_heads=3: expected a divisor of model.d_model=128"),
    ("model.n_kv_heads=3", r"model.n_kv_heads=3: expected a divisor of model.n_heads=4"),
    ("data.seq_len=512", r"data.seq_len=512: expected in 1..model.max_seq_len=256"),
    ("trainer.inject_failure_at_step=301", r"trainer.inject_failure_at_step=301: expected null or in 1..trainer.max_steps=300"),
    ("trainer.profile_steps=[20,10]", r"trainer.profile_steps=\(20, 10\): expected null or \[first, last\] with 1 <= first <= "
                                     r"last <= trainer.max_steps=300"),
    ("trainer.profile_steps=[5]", r"trainer.profile_steps=\[5\]: expected a list of 2 numbers or null"),
    ("cluster.name=k8s", r"cluster.name='k8s': expected one of local, ray"),
    ("deepspeed.optimizer.betas=[0.9]", r"deepspeed.optimizer.betas=\[0.9\]: expected a list of 2 numbers"),
    ("model.ffn=sparse", r"model.ffn='sparse': expected one of dense, moe"),
    ("parallel.expert=2", r"parallel.expert=2: expected 1 for model.ffn=dense"),
    ("data.token_dtype=int8", r"data.token_dtype='int8': expected one of uint16, uint32"),
    ("data.vocab_size=70000", r"data.vocab_size=70000: .*uint16"),
    ("data.corpus=/no/such/dir/*.txt", r"data.corpus='/no/such/dir/\*.txt': "),
    ("tracking.uri=ftp://nowhere", r"tracking.uri='ftp://nowhere': expected null, a path, or a URI of scheme file, sqlite"),
    ("tracking.uri=http://", r"tracking.uri='http://': expected"),
    ("cluster.address=nowhere", r"cluster.address='nowhere': expected null \(a local Ray instance\), auto, or host:port"),
])
def test_bad_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_job(override)


MOE = ("model.ffn=moe", "moe.num_experts=4")


@pytest.mark.parametrize("overrides, message", [
    ((*MOE, "+moe.experts=4"), r"moe.experts: unknown key; allowed keys under moe: router, num_experts, "),
    ((*MOE, "moe.top_k=5"), r"moe.top_k=5 must be <= the 4 experts"),
    ((*MOE, "moe=moepp", "moe.top_k=9"), r"moe.top_k=9 must be <= the 8 experts .*zero-computation"),
    ((*MOE, "moe.router=switch"), r"moe.router must be one of \('topk', 'blockffn', 'moepp'\), got 'switch'"),
    ((*MOE, "parallel.expert=3"), r"parallel.expert=3: expected a divisor of moe.num_experts=4"),
    ((*MOE, "model.first_dense_layers=4"), r"model.first_dense_layers=4: expected < model.n_layers=4"),
    ((*MOE, "moe=blockffn", "moe.chunk_sparsity_coef=0"), r"moe.chunk_sparsity_coef=0: expected > 0 while"),
    ((*MOE, "moe=blockffn", "trainer.compile=true", "trainer.cuda_graphs=true"),
     r"trainer.cuda_graphs=true: expected a model with fixed shapes; moe.router=blockffn sizes its expert rows"),
    ((*MOE, "parallel.expert=2", "trainer.num_workers=2", "trainer.compile=true", "trainer.cuda_graphs=true"),
     r"trainer.cuda_graphs=true: expected a model with fixed shapes; parallel.expert=2 exchanges rows"),
    (("trainer.cuda_graphs=true",), r"trainer.cuda_graphs=True: expected false unless trainer.compile=true"),
    (("trainer.compile=true", "trainer.cuda_graphs=true", "deepspeed=zero3"),
     r"trainer.cuda_graphs=True: expected false with deepspeed.zero_stage=3 \(the graphs need ZeRO-2\)"),
    (("trainer.compile=true", "trainer.cuda_graphs=true", "deepspeed=zero1"),
     r"trainer.cuda_graphs=True: expected false with deepspeed.zero_stage=1 \(the graphs need ZeRO-2\)"),
    (("trainer.chunk_sparsity_schedule.stable_steps=50",), r"trainer.chunk_sparsity_schedule.stable_steps=50: expected > "),
    (("parallel.sequence=3",), r"parallel.sequence=3: expected a divisor of model.n_heads=4"),
    (("model.n_kv_heads=2", "parallel.sequence=4"), r"parallel.sequence=4: expected a divisor of model.n_kv_heads=2"),
    (("data.seq_len=250", "parallel.sequence=4"), r"parallel.sequence=4: expected a divisor of data.seq_len=250"),
    (("parallel.data=0",), r"parallel.data=0: expected >= 1 or null"),
    (("model=vdit_tiny",), r"data.corpus='python_docs': expected procedural_video for model.family=vdit"),
    (("data=procedural_video",), r"data.corpus=.procedural_video.: expected a token corpus .* for model.family=lm"),
    (("experiment=vdit_smoke", "data.height=30"), r"data.height=30: expected a multiple of model.patch\[1\]=4"),
    (("experiment=vdit_smoke", "data.fps=0"), r"data.fps=0.0: expected a positive number"),
    (("experiment=vdit_smoke", "parallel.sequence=4"),
     r"parallel.sequence=4: expected a divisor of model.n_heads=2 and of the 256 tokens of a clip \(the grid 4 x 8 x 8"),
    (("experiment=vdit_smoke", "+model.frames=4"), r"model.frames: unknown key \(it is set by the data\)"),
])
def test_impossible_moe_and_parallel_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_job(*overrides)


def test_moe_presets_map_onto_the_layer_config():
    blockffn = compose_job("model.ffn=moe", "moe=blockffn").moe_config()
    assert blockffn.router == "blockffn" and blockffn.activation == "silu"  # the paper's non-gated expert, explicit
    moepp = compose_job("model.ffn=moe", "moe=moepp", "moe.tau=0.5").moe_config()
    assert moepp.router == "moepp" and moepp.tau == 0.5 and moepp.activation == "swiglu"
    assert compose_job().moe_config() is None  # model.ffn=dense: the moe group is not used
    lm = compose_job("experiment=lm_topk").model_config(vocab_size=8192, eot_id=0)
    assert lm.ffn == "moe" and lm.moe.num_experts == 16 and lm.d_model == 768


def test_the_layout_must_fill_the_workers():
    job = compose_job("model.ffn=moe", "moe.num_experts=4", "parallel.expert=4")
    with pytest.raises(ConfigError, match=r"parallel.expert=4 x parallel.sequence=1: expected a divisor of the 2 workers"):
        plan_workers(job, {"CPU": 2})
    assert plan_workers(job, {"CPU": 16, "GPU": 8}).num_workers == 8
    job = compose_job("model.ffn=moe", "moe.num_experts=4", "parallel.expert=2", "parallel.sequence=2", "parallel.data=1")
    with pytest.raises(ConfigError, match=r"parallel.data=1: expected 2, so that parallel.data x parallel.expert x "
                                          r"parallel.sequence = the 8 workers"):
        plan_workers(job, {"CPU": 16, "GPU": 8})
    assert job.parallel.data_shards(4) == 2  # a sequence-parallel pair reads one shard
    fractional = compose_job("trainer.num_workers=4", "trainer.cpus_per_worker=0.5")
    assert plan_workers(fractional, {"CPU": 2}).num_workers == 4


@pytest.mark.parametrize("uri", ["sqlite:////tmp/x/mlflow.db", "http://127.0.0.1:5000", "file:///tmp/mlruns", "mlruns",
                                 "postgresql+psycopg2://u:p@db/mlflow", "databricks"])
def test_tracking_uris_mlflow_can_store_runs_at_are_accepted(uri):
    assert compose_job(f"tracking.uri={uri}").tracking.uri == uri


def test_unknown_experiment_and_unwritable_root_fail_before_any_work(tmp_path):
    """An experiment that does not exist names the group and its options; a cluster.root that cannot be
    created is a config error naming the key (exit 2), before Ray starts."""
    train = [sys.executable, str(CONFIGS.parent / "launch" / "train.py")]
    proc = subprocess.run([*train, "experiment=nope", "--cfg", "job"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Could not find 'experiment/nope'" in proc.stderr and "smoke_moe" in proc.stderr
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    proc = subprocess.run([*train, "experiment=smoke", f"cluster.root={blocked}/runs"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"config error: cluster.root='{blocked}/runs': cannot create it" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_missing_key_is_named():
    tree = compose_tree()
    del tree["trainer"]["seed"]
    with pytest.raises(ConfigError, match=r"trainer.seed: missing \(expected an integer\)"):
        JobConfig.from_dict(tree)


def test_worker_plan_against_the_machine():
    job = compose_job()
    assert plan_workers(job, {"CPU": 2}) .num_workers == 2
    gpu = plan_workers(job, {"CPU": 64, "GPU": 8})
    assert gpu.use_gpu and gpu.num_workers == 8
    too_many = r"trainer.num_workers=4: .* need 4 CPUs, the cluster has 2; expected trainer.num_workers <= 2"
    with pytest.raises(ConfigError, match=too_many):
        plan_workers(compose_job("trainer.num_workers=4"), {"CPU": 2})
    with pytest.raises(ConfigError, match=r"trainer.num_workers=3: expected at most 2, one worker per GPU"):
        plan_workers(compose_job("trainer.num_workers=3"), {"CPU": 16, "GPU": 2})
    with pytest.raises(ConfigError, match=r"trainer.use_gpu=True: expected GPUs"):
        plan_workers(compose_job("trainer.use_gpu=true"), {"CPU": 2})
    with pytest.raises(ConfigError, match=r"deepspeed.precision='bf16': CPU workers train in fp32"):
        plan_workers(compose_job("deepspeed.precision=bf16"), {"CPU": 2})


def test_deepspeed_config_mapping():
    job = compose_job("deepspeed=zero3", "deepspeed.gradient_accumulation_steps=4")
    cpu = deepspeed_config(job.deepspeed, 300, use_gpu=False, world_size=2)
    assert cpu["zero_optimization"] == {"stage": 3, "reduce_scatter": True}
    assert cpu["gradient_accumulation_steps"] == 4 and cpu["train_micro_batch_size_per_gpu"] == 8
    assert not cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"]
    assert cpu["optimizer"]["type"] == "AdamW" and cpu["optimizer"]["params"]["torch_adam"]
    assert cpu["scheduler"]["type"] == "WarmupCosineLR"
    assert cpu["scheduler"]["params"]["total_num_steps"] == 300
    assert cpu["scheduler"]["params"]["cos_min_ratio"] == 0.1
    assert "fused" not in cpu["optimizer"]["params"]
    gpu = deepspeed_config(job.deepspeed, 300, use_gpu=True, world_size=1)
    assert gpu["bf16"]["enabled"] and gpu["optimizer"]["params"]["fused"]  # torch's single-pass AdamW kernel
    assert gpu["bf16"]["check_grad_overflow"] is False  # the loop's divergence stop replaces it
    assert gpu["zero_optimization"]["reduce_scatter"] is False  # one worker: no divide by 1, no extra copy
    constant = compose_job("deepspeed.lr_schedule.name=warmup_constant").deepspeed
    assert deepspeed_config(constant, 300, use_gpu=False, world_size=1)["scheduler"]["type"] == "WarmupLR"


def test_every_key_in_the_group_files_is_documented():
    """In the files that define a group's keys (not those that override a base), each key line has a comment."""
    for path in CONFIGS.rglob("*.yaml"):
        if "defaults:" in path.read_text() or path.parent.name == "experiment":
            continue  # overrides of a documented base, described by their header
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if re.match(r"^\s*[A-Za-z_]+:", line) and not line.lstrip().startswith("defaults"):
                documented = "#" in line or (number and lines[number - 1].lstrip().startswith("#"))
                assert documented, f"{path.relative_to(CONFIGS)}:{number + 1}: undocumented key: {line.strip()}"


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONFIGS.parent / "launch" / "train.py"), *args],
                          cwd=CONFIGS.parent, capture_output=True, text=True, timeout=300)


def test_cfg_job_prints_the_resolved_config():
    proc = launch("--cfg", "job", "--resolve", "experiment=smoke", "deepspeed=zero1")
    assert proc.returncode == 0, proc.stderr
    printed = OmegaConf.create(proc.stdout)
    assert printed.deepspeed.zero_stage == 1 and printed.trainer.max_steps == 30
    assert printed.cluster.root == os.environ.get("SPARTA_ROOT", "runs")


@pytest.mark.parametrize("override, message", [
    ("trainer.lrr=1", "Could not override 'trainer.lrr'"),  # Hydra refuses keys absent from the config
    ("deepspeed.optimizer.lr=-1", "config error: deepspeed.optimizer.lr=-1.0: expected > 0"),
    ("deepspeed.zero_stage=7", "config error: deepspeed.zero_stage=7: expected one of 0, 1, 2, 3"),
    (f"trainer.num_workers={os.cpu_count() + 1}", f"config error: trainer.num_workers={os.cpu_count() + 1}: "),
])
def test_bad_config_fails_before_ray_starts(override, message, tmp_path):
    proc = launch(override, f"cluster.root={tmp_path}")
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert "Ray instance" not in proc.stderr + proc.stdout


def test_a_split_too_small_for_one_global_micro_batch_is_refused_before_any_worker(tmp_path):
    """The smoke corpus's validation split (~11k tokens) cannot fill 2 workers x 4 windows of 4096 tokens:
    a config error naming data.seq_len and what would fit, not a worker failing (and retrying) on it."""
    proc = launch("experiment=smoke", "data.seq_len=4096", "model.max_seq_len=4096", f"cluster.root={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error: data.seq_len=4096: the validation split has" in proc.stderr
    assert "deepspeed.micro_batch_size" in proc.stderr and "[sparta] step" not in proc.stdout


def test_a_missing_init_from_run_is_refused_before_ray_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.init_from='no-such-run': no-such-run: not a directory, nor an MLflow run"):
        find_init_checkpoint(compose_job("trainer.init_from=no-such-run"), tmp_path)
    assert find_init_checkpoint(compose_job(), tmp_path) is None
