"""Regenerate the schemas in this folder, which tests/test_k8s_manifests.py validates launch/k8s/ against.

    python tests/schemas/vendor.py KUBERAY_CRDS K8S_SCHEMAS

KUBERAY_CRDS: `ray-operator/config/crd/bases/` of a KubeRay release (ray.io_rayclusters.yaml, ray.io_rayjobs.yaml).
K8S_SCHEMAS: a `kubernetes-json-schema/v<version>-local-strict/` folder of the `kubernetes-validate` package (PyPI),
for the Kubernetes version that the KubeRay release builds against (its go.mod's k8s.io/api).

Written, as gzipped JSON: kuberay-<crd>.json.gz, each CRD's v1 `openAPIV3Schema` made strict (see `strict`), and
kubernetes.json.gz, the Deployment, Service and PersistentVolumeClaim schemas with only the definitions they reach.
Descriptions are dropped; a `$comment` names the source.
"""

import gzip
import json
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
KUBERAY_RELEASE = "v1.7.0"  # the release launch/k8s/ names; bump both together
K8S_SOURCE = "PyPI kubernetes-validate 1.37.0 (from yannh/kubernetes-json-schema)"
CORE_KINDS = {"apps/v1/Deployment": "io.k8s.api.apps.v1.Deployment",
              "v1/Service": "io.k8s.api.core.v1.Service",
              "v1/PersistentVolumeClaim": "io.k8s.api.core.v1.PersistentVolumeClaim"}


def strict(schema):
    """Refuse unknown fields, as `kubectl apply` does (strict field validation): every object schema that lists
    its properties, is no map and does not preserve unknown fields gets `additionalProperties: false`."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: {name: strict(sub) for name, sub in value.items()} if key == "properties" else strict(value)
           for key, value in schema.items() if not (key == "description" and isinstance(value, str))}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_schema(crd_file: Path, source: str) -> dict:
    crd = yaml.safe_load(crd_file.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return {"$comment": f"{crd['spec']['names']['kind']} ray.io/v1 from {source}/{crd_file.name} (made strict)",
            **strict(version["schema"]["openAPIV3Schema"])}


def core_schemas(folder: Path, source: str) -> dict:
    definitions = json.loads((folder / "_definitions.json").read_text())["$defs"]
    kept, todo = {}, list(CORE_KINDS.values())
    while todo:
        name = todo.pop()
        if name not in kept:
            kept[name] = strict(definitions[name])
            todo += re.findall(r'"#/\$defs/([^"]+)"', json.dumps(definitions[name]))
    return {"$comment": f"Kubernetes {folder.name.removesuffix('-local-strict')} schemas from {source}",
            "$schema": "https://json-schema.org/draft/2020-12/schema", "kinds": CORE_KINDS, "$defs": kept}


def write(name: str, schema: dict) -> None:
    """Gzipped with mtime 0, so that the bytes depend only on the schema (62 KB for the three instead of 1.2 MB)."""
    with gzip.GzipFile(HERE / name, "wb", mtime=0) as out:
        out.write(json.dumps(schema, indent=1, sort_keys=True).encode() + b"\n")


def main(kuberay_crds: str, k8s_schemas: str) -> None:
    for crd in ("rayclusters", "rayjobs"):
        write(f"kuberay-{crd}.json.gz", crd_schema(Path(kuberay_crds) / f"ray.io_{crd}.yaml",
                                                   f"github.com/ray-project/kuberay {KUBERAY_RELEASE} "
                                                   "ray-operator/config/crd/bases"))
    write("kubernetes.json.gz", core_schemas(Path(k8s_schemas), K8S_SOURCE))


if __name__ == "__main__":
    main(*sys.argv[1:])
