"""Expert parallelism over NCCL, one GPU per process: the check of tests/test_moe_ep.py (2 ranks, each
with half of the experts, against one process with all of them; fp32, tolerance 1e-5), run on CUDA.
NCCL refuses two ranks on one GPU, so this needs a machine with at least 2."""
import importlib

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL: one rank per GPU)")


def test_expert_parallel_over_nccl_matches_single_process(tmp_path):
    # The spawned ranks unpickle their entry point by module name: import the CPU test under the
    # name pytest gives it (`python -m pytest` from the repository root).
    cpu_ep_test = importlib.import_module("tests.test_moe_ep")
    cpu_ep_test.run_expert_parallel_check(tmp_path, "nccl")
