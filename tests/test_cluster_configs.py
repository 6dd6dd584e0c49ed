"""Offline checks of the Ray cluster configs in cluster/ (no cloud credentials, no cluster).

cluster/cluster.yaml goes through what `ray up` does before it contacts the cloud: Ray's
`prepare_config` (merge with the provider's defaults) and `validate_config` (Ray's JSON schema
`ray/autoscaler/ray-schema.json` plus its cross-field checks). cluster/kuberay.yaml is checked
for the KubeRay resources it must hold. The runtime envs' pip lists must be pyproject.toml's
dependencies, and the documented job command must use the GPU workers: `--gpu always`, one
actor per GPU the cluster can grow to, and an output every node can write.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

Config = dict[str, Any]

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster" / "cluster.yaml"
KUBERAY_YAML = ROOT / "cluster" / "kuberay.yaml"
RUNTIME_ENV_YAML = ROOT / "cluster" / "runtime_env.yaml"
CLUSTER_README = ROOT / "cluster" / "README.md"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

STUDY_SPEC = re.compile(r"jobs/studies/[^/\s]+\.toml")


def load_cluster_yaml() -> Config:
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    assert isinstance(config, dict)
    return config


def ray_validate(config: Config) -> Config:
    """What `ray up` runs before the provider bootstrap: fill defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def ray_schema() -> Config:
    schema = json.loads(RAY_SCHEMA.read_text())
    assert isinstance(schema, dict)
    return schema


# ---------------------------------------------------------------- cluster launcher config


def test_cluster_yaml_matches_rays_schema_as_written() -> None:
    jsonschema.validate(load_cluster_yaml(), ray_schema())


def test_cluster_yaml_passes_rays_validation() -> None:
    prepared = ray_validate(load_cluster_yaml())
    assert prepared["cluster_name"] == "noisemem"
    assert prepared["provider"]["type"] == "aws"


def test_cluster_yaml_has_a_gpu_worker_type() -> None:
    config = load_cluster_yaml()
    head = config["head_node_type"]
    node_types: dict[str, Config] = config["available_node_types"]
    assert node_types[head]["resources"].get("GPU", 0) == 0
    gpu_workers = {
        name: spec
        for name, spec in node_types.items()
        if name != head and spec["resources"].get("GPU", 0) >= 1
    }
    assert gpu_workers, "no worker node type requests a GPU"
    for spec in gpu_workers.values():
        assert spec["min_workers"] == 0
        assert spec["max_workers"] == 4
    assert config["max_workers"] == 4


def test_cluster_yaml_installs_the_synced_repository() -> None:
    config = load_cluster_yaml()
    assert config["file_mounts"]["/home/ray/noisemem"] == "."
    assert any(
        "/home/ray/noisemem" in command and "pip install -e ." in command
        for command in config["setup_commands"]
    )
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in command for command in config[key]), key


def test_cluster_yaml_gpu_workers_can_write_the_store_to_s3() -> None:
    """The documented job writes its store to S3 from the GPU workers; `ray up` gives only
    the head an instance profile unless a node type names one."""
    config = load_cluster_yaml()
    head = config["head_node_type"]
    for name, spec in config["available_node_types"].items():
        if name != head and spec["resources"].get("GPU", 0) >= 1:
            assert spec["node_config"]["IamInstanceProfile"] == {"Name": "ray-autoscaler-v1"}


def _unknown_top_level_key(config: Config) -> None:
    config["max_worker"] = 4


def _max_workers_as_string(config: Config) -> None:
    config["max_workers"] = "4"


def _gpu_count_as_string(config: Config) -> None:
    config["available_node_types"]["ray.worker.gpu"]["resources"]["GPU"] = "1"


def _node_type_without_node_config(config: Config) -> None:
    del config["available_node_types"]["ray.worker.gpu"]["node_config"]


def _unknown_head_node_type(config: Config) -> None:
    config["head_node_type"] = "ray.head.missing"


BREAKAGES: list[Callable[[Config], None]] = [
    _unknown_top_level_key,
    _max_workers_as_string,
    _gpu_count_as_string,
    _node_type_without_node_config,
    _unknown_head_node_type,
]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__.strip("_"))
def test_broken_cluster_yaml_fails_rays_validation(breakage: Callable[[Config], None]) -> None:
    broken = load_cluster_yaml()
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(broken)


# ---------------------------------------------------------------- KubeRay resources


def kuberay_docs() -> list[Config]:
    docs = [doc for doc in yaml.safe_load_all(KUBERAY_YAML.read_text()) if doc is not None]
    assert all(isinstance(doc, dict) for doc in docs)
    return docs


def by_kind(kind: str) -> Config:
    (doc,) = (doc for doc in kuberay_docs() if doc["kind"] == kind)
    return doc


def cluster_specs() -> Iterator[tuple[str, Config]]:
    yield "RayCluster", by_kind("RayCluster")["spec"]
    yield "RayJob", by_kind("RayJob")["spec"]["rayClusterSpec"]


def gpu_limit(group: Config) -> int:
    containers: list[Config] = group["template"]["spec"]["containers"]
    return sum(
        int(str(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)))
        for c in containers
    )


def test_kuberay_kinds_and_api_version() -> None:
    docs = kuberay_docs()
    assert sorted(doc["kind"] for doc in docs) == ["RayCluster", "RayJob"]
    assert {doc["apiVersion"] for doc in docs} == {"ray.io/v1"}


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_kuberay_cluster_has_head_and_gpu_worker_group(owner: str) -> None:
    spec = dict(cluster_specs())[owner]
    head_containers: list[Config] = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert head_containers and all(
        c["image"].startswith("rayproject/ray:") for c in head_containers
    )
    groups: list[Config] = spec["workerGroupSpecs"]
    gpu_groups = [group for group in groups if gpu_limit(group) >= 1]
    assert gpu_groups, f"{owner}: no worker group with an nvidia.com/gpu limit"
    for group in gpu_groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        images = [c["image"] for c in group["template"]["spec"]["containers"]]
        assert any(image.startswith("rayproject/ray:") for image in images)


def test_rayjob_cluster_spec_equals_the_raycluster() -> None:
    specs = dict(cluster_specs())
    assert specs["RayJob"] == specs["RayCluster"]


def runtime_envs() -> dict[str, Config]:
    envs = {
        "RayJob": yaml.safe_load(by_kind("RayJob")["spec"]["runtimeEnvYAML"]),
        "runtime_env.yaml": yaml.safe_load(RUNTIME_ENV_YAML.read_text()),
    }
    assert all(isinstance(env, dict) for env in envs.values())
    return envs


def package_dependencies() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(pyproject["project"]["dependencies"])


def test_rayjob_runtime_env_is_valid_for_ray() -> None:
    runtime_env = runtime_envs()["RayJob"]
    assert re.fullmatch(r"https://\S+\.zip", runtime_env["working_dir"])
    parsed = RuntimeEnv(**runtime_env)  # Ray's own parser and validator
    assert parsed["pip"]["packages"] == runtime_env["pip"]
    assert RuntimeEnv(**runtime_envs()["runtime_env.yaml"])["pip"]["packages"]


@pytest.mark.parametrize("where", ["RayJob", "runtime_env.yaml"])
def test_runtime_env_installs_every_dependency_of_the_package(where: str) -> None:
    """What the job imports (tomli-w, numba, matplotlib...) is what pyproject.toml declares:
    the pip list must be those dependencies, specifiers and all, except Ray, which the
    image provides at the cluster's version (a runtime env must not reinstall it)."""
    pip = runtime_envs()[where]["pip"]
    deps = package_dependencies()
    ray_deps = [d for d in deps if Requirement(d).name == "ray"]
    assert len(ray_deps) == 1
    assert sorted(pip) == sorted(d for d in deps if d not in ray_deps)
    assert len(pip) == len(set(pip))


def image_ray_versions() -> set[str]:
    images = re.findall(r"rayproject/ray:([0-9.]+)-", CLUSTER_YAML.read_text())
    images += re.findall(r"rayproject/ray:([0-9.]+)-", KUBERAY_YAML.read_text())
    images += [spec["rayVersion"] for _, spec in cluster_specs()]
    return set(images)


def test_cluster_ray_version_satisfies_the_package() -> None:
    (ray_dep,) = (d for d in package_dependencies() if Requirement(d).name == "ray")
    versions = image_ray_versions()
    assert versions == {"2.60.0"}
    assert all(Requirement(ray_dep).specifier.contains(v) for v in versions)


def documented_commands(text: str) -> str:
    """Shell commands of a file, comments and line continuations undone, spaces collapsed."""
    lines = [re.sub(r"^\s*#", "", line) for line in text.splitlines()]
    return re.sub(r"\s+", " ", re.sub(r"\\\s*\n", " ", "\n".join(lines)))


def max_cluster_gpus_launcher() -> int:
    config = load_cluster_yaml()
    head = config["head_node_type"]
    per_worker = [
        (spec["max_workers"], int(spec["resources"].get("GPU", 0)))
        for name, spec in config["available_node_types"].items()
        if name != head
    ]
    by_type = sum(workers * gpus for workers, gpus in per_worker)
    # max_workers caps the workers of all types together
    return min(by_type, config["max_workers"] * max(gpus for _, gpus in per_worker))


def max_cluster_gpus_kuberay() -> int:
    spec = by_kind("RayJob")["spec"]["rayClusterSpec"]
    return sum(group["maxReplicas"] * gpu_limit(group) for group in spec["workerGroupSpecs"])


def test_rayjob_runs_a_study_on_every_gpu_worker() -> None:
    """The job the cluster docs give: an existing spec, every actor on a GPU (the GPU workers
    start at zero, so "auto" would see none and choose CPUs), one actor per GPU the cluster
    can grow to (the head has no CPUs, so actors = 0 would start one), and an output every
    node can write (a URI, not a path on one node's disk)."""
    from noisemem.cli import build_parser
    from noisemem.studies.spec import StudySpec

    spec = by_kind("RayJob")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/run_study.py"]
    assert STUDY_SPEC.fullmatch(argv[2]), argv
    StudySpec.from_toml(ROOT / argv[2])  # exists and is valid
    args = build_parser().parse_args(["run", *argv[2:]])
    assert args.gpu == "always"
    assert args.actors == max_cluster_gpus_kuberay() == max_cluster_gpus_launcher() == 4
    assert re.fullmatch(r"s3://[^/\s]+/\S+", args.output), args.output
    assert spec["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize("doc", [CLUSTER_YAML, KUBERAY_YAML, CLUSTER_README], ids=lambda p: p.name)
def test_cluster_docs_submit_the_rayjobs_command(doc: Path) -> None:
    entrypoint = " ".join(shlex.split(by_kind("RayJob")["spec"]["entrypoint"]))
    assert entrypoint in documented_commands(doc.read_text())
