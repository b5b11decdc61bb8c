"""The multi-node path for real, on one machine: a two-node Ray cluster (`ray start --head` and a second
`ray start --address=...`, each with its own temp dir, ports and one CPU), a training job sent with
`ray job submit`, and the second node killed mid-run (its raylet SIGKILLed, then the rest of its
processes), after the first checkpoint.

One CPU per node and one CPU per worker force the two Ray Train workers onto different nodes. A
worker group can only restart on two nodes, so the test brings the second node back (a fresh
`ray start`), as a cluster's node provider would; Ray Train (`trainer.max_failures=1`) then restarts
the group from the newest checkpoint. Where each worker ran comes from Ray's state API (the platform
records only the host name, the same for both nodes here).

Each `ray start` runs in its own session: every process of that node (its workers too, and the job's
driver as their descendant) is found through it and killed at the end. `ray stop` is never used: it
stops every Ray instance of the machine, other tests' and engineers' among them.
"""

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from e2e_helpers import REPO, free_port, history, mlflow_runs

from sparta.platform import checkpoint

pytestmark = pytest.mark.slow

RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
RUN = "multinode"
MAX_STEPS, CHECKPOINT_EVERY = 30, 5
HEAD_RESOURCE, SECOND_RESOURCE = "sparta_test_head", "sparta_test_second"  # name the nodes in the state API


class Node:
    """One `ray start` of this machine: its own temp dir and ports, in a session of its own."""

    def __init__(self, name: str, env: dict, log_dir: Path):
        # Short: Ray's socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must fit in 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"sparta-{name}-", dir="/tmp"))
        self.name, self.env, self.log = name, env, log_dir / f"ray-start-{name}.log"
        self.session: int | None = None
        self.seen: dict[int, psutil.Process] = {}  # every process of the node noticed so far (`processes`)

    def start(self, *args: str, resource: str) -> None:
        command = [RAY, "start", f"--temp-dir={self.temp_dir}", "--num-cpus=1",
                   f"--resources={json.dumps({resource: 1})}", f"--dashboard-agent-listen-port={free_port()}",
                   "--min-worker-port=0", "--max-worker-port=0", f"--object-store-memory={100 * 2**20}",
                   "--disable-usage-stats", *args]
        with open(self.log, "w") as out:
            proc = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.session = proc.pid  # its daemons stay in this session once `ray start` has returned
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            rc = "no exit within 120 s"
        assert rc == 0, f"{' '.join(command)}: {rc}\n{self.log.read_text()[-3000:]}"

    def processes(self) -> list[psutil.Process]:
        """The node's processes: its session, plus their descendants that left it (the job's driver)."""
        if self.session is None:
            return []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == self.session:
                    self.seen[proc.pid] = proc
                    self.seen.update({child.pid: child for child in proc.children(recursive=True)})
            except (OSError, psutil.Error):
                pass
        return [proc for proc in self.seen.values() if proc.is_running()]

    def raylet(self) -> psutil.Process:
        raylets = [p for p in self.processes() if p.name() == "raylet"]
        assert len(raylets) == 1, f"node {self.name}: expected one raylet, found {raylets}"
        return raylets[0]

    def stop(self) -> list[str]:
        """SIGKILL every process of the node (SIGTERM makes the GCS and raylets linger ~10 s, the node's
        state lives in its temp dir anyway); returns the command lines still alive 10 s later."""
        procs = self.processes()
        for proc in procs:
            with_ignored(proc.kill)
        _, alive = psutil.wait_procs(procs, timeout=10)
        return [" ".join(with_ignored(p.cmdline) or [p.name()])[:150] for p in alive]


def with_ignored(call):
    try:
        return call()
    except psutil.Error:
        return None


def leftovers(paths: list[str]) -> list[str]:
    """`pgrep -f` for our paths: processes whose command line names one of our temp dirs or our root."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if proc.pid != os.getpid() and any(path in line for path in paths):
            found.append(f"{proc.pid}: {line[:150]}")
    return found


class Timeline(list):
    """What happened when, for the failure messages."""

    def __init__(self):
        super().__init__()
        self.start = time.monotonic()

    def __call__(self, event: str) -> None:
        self.append(f"{time.monotonic() - self.start:6.1f} s  {event}")


@dataclass
class Outcome:
    root: Path
    temp_dirs: list[Path]  # the nodes' own
    output: str  # `ray job submit`'s: the job's logs
    rc: int | None
    killed_after: int  # the step of the newest complete checkpoint when the raylet was killed
    last_checkpoint: int | None  # the newest one before the restarted worker group resumed
    placement: dict  # Ray's state API after the job: RayTrainWorker actors and the nodes
    timeline: Timeline

    def logs(self) -> str:
        console = self.root / "ray" / RUN / "console.log"
        return ("\n--- timeline ---\n" + "\n".join(self.timeline)
                + f"\n--- ray job submit (last 6000 chars) ---\n{self.output[-6000:]}"
                + f"\n--- console.log ---\n{console.read_text()[-3000:] if console.exists() else '(none)'}")


STATE_QUERY = """
import json, sys
from ray.util.state import list_actors, list_nodes
address = sys.argv[1]
actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)
nodes = list_nodes(address=address, detail=True, limit=1000)
print(json.dumps({
    "actors": [{k: getattr(a, k) for k in ("actor_id", "node_id", "placement_group_id", "pid", "state")} for a in actors],
    "nodes": [{"node_id": n.node_id, "node_ip": n.node_ip, "state": n.state, "is_head_node": n.is_head_node,
               "resources": dict(n.resources_total), "start_time_ms": n.start_time_ms} for n in nodes],
}))
"""


def step_of(path: Path | None) -> int | None:
    return int(path.name.removeprefix("checkpoint_")) if path else None


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    """Start the cluster, submit the job, kill the second node (its raylet first) after the first checkpoint
    and start that node again, wait for the job; always kill every process of the cluster, and check that
    none is left."""
    root = tmp_path_factory.mktemp("shared")  # cluster.root: both "nodes" see it
    logs = tmp_path_factory.mktemp("multinode-logs")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))  # this cluster's own token
    gcs, dashboard = free_port(), free_port()
    nodes = [Node("head", env, logs), Node("second", env, logs), Node("second-again", env, logs)]
    head, second, second_again = nodes
    timeline, job = Timeline(), None
    try:
        head.start("--head", f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
                   resource=HEAD_RESOURCE)
        second.start(f"--address=127.0.0.1:{gcs}", resource=SECOND_RESOURCE)
        timeline("cluster up")

        run_dir, job_out = root / "ray" / RUN, logs / "job.out"
        command = [RAY, "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir", str(REPO), "--",
                   sys.executable, "launch/train.py", "cluster=ray", "experiment=smoke", f"cluster.root={root}",
                   f"run_name={RUN}", f"trainer.max_steps={MAX_STEPS}", f"trainer.checkpoint_every={CHECKPOINT_EVERY}",
                   "trainer.eval_every=15", "trainer.log_every=1", "trainer.num_workers=2", "trainer.max_failures=1"]
        with open(job_out, "w") as out:
            job = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)

        deadline = time.monotonic() + 240
        while not checkpoint.complete(run_dir):
            assert job.poll() is None and time.monotonic() < deadline, \
                f"no checkpoint within 240 s (job client exit {job.poll()}):\n{job_out.read_text()[-6000:]}"
            time.sleep(0.1)
        second.raylet().kill()  # SIGKILL: no goodbye
        killed_after = step_of(checkpoint.latest(run_dir))
        # Then the rest of the machine: a worker outlives its raylet by 3-4 s, time enough to end this short
        # run before Ray takes the worker down.
        second.stop()
        timeline(f"second node killed (raylet first) after checkpoint {killed_after}")
        second_again.start(f"--address=127.0.0.1:{gcs}", resource=SECOND_RESOURCE)
        timeline("second node started again")

        # Until the restarted worker group says where it resumed from, no worker writes checkpoints:
        # the newest one seen meanwhile is the last checkpoint of the first attempt.
        console, last_checkpoint, failed = run_dir / "console.log", None, False
        deadline = time.monotonic() + 300
        while job.poll() is None and time.monotonic() < deadline:
            text = console.read_text()
            if not failed and " failed: " in text:
                failed = True
                timeline("a rank failed")
            if "resumed from the checkpoint" in text:
                timeline("resumed")
                break
            last_checkpoint = step_of(checkpoint.latest(run_dir))
            time.sleep(0.1)
        try:
            rc = job.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            rc = None
        timeline(f"job client exited: {rc}")
        placement = subprocess.run([sys.executable, "-c", STATE_QUERY, f"http://127.0.0.1:{dashboard}"], env=env,
                                   capture_output=True, text=True, timeout=120)
        assert placement.returncode == 0, placement.stdout + placement.stderr
        yield Outcome(root, [node.temp_dir for node in nodes], job_out.read_text(), rc, killed_after, last_checkpoint,
                      json.loads(placement.stdout.splitlines()[-1]), timeline)
    finally:
        if job is not None and job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=30)
        stubborn = [line for node in nodes for line in node.stop()]
        left = leftovers([str(node.temp_dir) for node in nodes] + [str(root)])
        for node in nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        assert not stubborn and not left, f"Ray processes left behind: {stubborn + left}"


def test_job_succeeds_after_the_second_node_dies_and_resumes_from_its_last_checkpoint(multinode):
    assert multinode.rc == 0 and "succeeded" in multinode.output, \
        f"the job failed (ray job submit exited {multinode.rc}){multinode.logs()}"
    console = (multinode.root / "ray" / RUN / "console.log").read_text()
    resumed = [int(step) for step in re.findall(r"resumed from the checkpoint at step (\d+)", console)]
    assert resumed == [multinode.last_checkpoint], (
        f"expected one resume, from the last checkpoint ({multinode.last_checkpoint}), got {resumed} (none: did the run "
        f"end before Ray noticed the node's death?){multinode.logs()}")
    assert multinode.killed_after <= resumed[0] < MAX_STEPS, multinode.logs()
    assert f"run {RUN} finished at step {MAX_STEPS}" in multinode.output, multinode.logs()

    client, runs = mlflow_runs(multinode.root)
    assert list(runs) == [RUN] and runs[RUN].info.status == "FINISHED", multinode.logs()
    loss = history(client, runs[RUN].info.run_id, "train/loss")
    assert sorted(loss) == list(range(1, MAX_STEPS + 1)), f"steps logged: {sorted(loss)}{multinode.logs()}"
    assert all(len(points) == 1 for points in loss.values()), {s: p for s, p in loss.items() if len(p) > 1}


def test_workers_ran_on_both_nodes_before_and_after_the_restart(multinode):
    """Ray's state API: each worker group (one placement group per attempt) had one worker on the head
    and one on the second node; the restarted group used the node that came back."""
    nodes, actors = multinode.placement["nodes"], multinode.placement["actors"]
    (head,) = [n["node_id"] for n in nodes if HEAD_RESOURCE in n["resources"] and n["is_head_node"]]
    seconds = sorted((n for n in nodes if SECOND_RESOURCE in n["resources"]), key=lambda n: n["start_time_ms"])
    assert len(seconds) == 2, nodes  # the killed node and the one that came back
    killed, came_back = (n["node_id"] for n in seconds)
    groups: dict[str, list[str]] = {}
    for actor in actors:
        groups.setdefault(actor["placement_group_id"], []).append(actor["node_id"])
    expected = [sorted([head, killed]), sorted([head, came_back])]
    assert sorted(sorted(group) for group in groups.values()) == sorted(expected), \
        f"worker nodes per placement group: {groups}; nodes: {nodes}{multinode.logs()}"


def test_checkpoints_and_the_mlflow_store_are_in_the_shared_root(multinode):
    """Everything the run writes is under cluster.root, nothing in a node's own temp dir (the driver's
    working directory, a Ray session dir)."""
    root = multinode.root
    run_dir = root / "ray" / RUN
    assert {"mlflow.db", "mlartifacts", "ray", "data", "hydra"} <= {p.name for p in root.iterdir()}, list(root.iterdir())
    assert (run_dir / "console.log").is_file()
    assert [p.name for p in checkpoint.complete(run_dir)][-1] == f"checkpoint_{MAX_STEPS:08d}"
    assert json.loads((run_dir / f"checkpoint_{MAX_STEPS:08d}" / "state.json").read_text())["step"] == MAX_STEPS
    client, runs = mlflow_runs(root)
    run = runs[RUN]
    assert run.data.tags["sparta.checkpoint_dir"] == str(run_dir)
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(root / "mlartifacts"), run.info.artifact_uri
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "loss_curve.png"}
    strays = [path for temp in multinode.temp_dirs for pattern in ("checkpoint_*", "mlflow.db", "mlartifacts", "console.log")
              for path in temp.rglob(pattern)]
    assert strays == [], f"run outputs in a node's own temp dir: {strays}"
