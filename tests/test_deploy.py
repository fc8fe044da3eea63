"""deploy/: every YAML parses and names what the cluster needs (node types, custom resources, ports, secrets)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ROLES = {"prefill": "prefill_gpu", "decode": "decode_gpu"}


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(path: Path) -> dict[str, dict]:
    out = {}
    for d in docs(path):
        assert {"apiVersion", "kind", "metadata"} <= d.keys(), f"{path.name}: a document lacks apiVersion/kind/metadata"
        out[d["kind"]] = d
    return out


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_parses(path):
    assert docs(path), f"{path} is empty"


def test_launcher_has_head_and_gpu_groups_placed_by_custom_resources():
    cfg = docs(DEPLOY / "ray-cluster.yaml")[0]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert "GPU" not in types[cfg["head_node_type"]]["resources"]
    for role, resource in ROLES.items():
        (name,) = [n for n, t in types.items() if resource in t["resources"]]
        node = types[name]
        assert role in name
        assert node["resources"][resource] == node["resources"]["GPU"] > 0, "one custom unit per GPU"
        assert node["min_workers"] <= node["max_workers"] <= cfg["max_workers"]
        assert "node_config" in node
    other = {"prefill_gpu": "decode_gpu", "decode_gpu": "prefill_gpu"}
    for t in types.values():  # no node type offers both kinds: actors of one kind cannot land on the other's GPUs
        assert not all(k in t["resources"] for k in other)
    assert cfg["docker"]["image"]
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_cmds and "pdllm serve --config" in head_cmds
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])


def ray_start_resources(group: dict) -> dict:
    raw = group["rayStartParams"]["resources"]
    return json.loads(json.loads(raw))  # KubeRay wants a quoted JSON string: '"{\"x\": 1}"'


def test_raycluster_worker_groups_carry_resources_and_node_labels():
    rc = by_kind(DEPLOY / "k8s" / "raycluster.yaml")["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["grpc-api"] == 50051 and ports["metrics"] == 9090 and ports["gcs-server"] == 6379
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == set(ROLES)
    for role, resource in ROLES.items():
        g = groups[role]
        res = ray_start_resources(g)
        gpus = int(g["rayStartParams"]["num-gpus"])
        pod = g["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        assert res == {resource: gpus} and int(limits["nvidia.com/gpu"]) == gpus
        assert pod["nodeSelector"] == {"pdllm.io/gpu-role": role}
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        env = {e["name"] for e in pod["containers"][0]["env"]}
        assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= env
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert {"/etc/pdllm", "/models"} <= mounts


def test_rayjob_serves_the_api_on_the_cluster():
    job = by_kind(DEPLOY / "k8s" / "rayjob-serve.yaml")["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "pdllm"}
    entry = job["spec"]["entrypoint"]
    assert re.search(r"pdllm serve --config /etc/pdllm/config\.yaml .*--host 0\.0\.0\.0 --port 50051", entry)


def test_redis_has_password_secret_service_and_persistence():
    objs = by_kind(DEPLOY / "k8s" / "redis.yaml")
    secret, svc, sts = objs["Secret"], objs["Service"], objs["StatefulSet"]
    assert "password" in secret["stringData"]
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 6379 and port["name"] == "redis"
    pod = sts["spec"]["template"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    assert "--requirepass" in c["args"] and "$(REDIS_PASSWORD)" in c["args"]
    refs = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e]
    assert {"name": secret["metadata"]["name"], "key": "password"} in refs
    assert "--appendonly" in c["args"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] in {m["name"] for m in c["volumeMounts"]}
    assert {p["name"] for p in c["ports"]} >= {port["targetPort"]}


def test_dockerfile_builds_on_official_pytorch_cuda_and_installs_the_package():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-(runtime|devel)", base)
    assert re.search(r"pip install \.", text)
    for folder in ("pdllm", "cluster", "prefill_node", "decode_node", "kernels", "proto"):
        assert re.search(rf"^COPY {folder} ", text, re.M), f"the image misses {folder}/"
        assert (DEPLOY.parent / folder).is_dir()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "**" in ignore and "!pdllm/**" in ignore


def test_base_image_torch_satisfies_the_package_pin():
    """Otherwise `pip install .` in the image would replace the base image's CUDA torch with another build."""
    import tomllib
    from packaging.requirements import Requirement

    base = re.search(r"^FROM\s+pytorch/pytorch:(\d+\.\d+\.\d+)-", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)
    deps = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    assert torch.specifier.contains(base), f"image torch {base} is outside the package's {torch.specifier}"


def test_config_reaches_every_pod_from_a_secret():
    """The config carries the Redis password (redis_url), so it is mounted from a Secret, never a ConfigMap."""
    spec = by_kind(DEPLOY / "k8s" / "raycluster.yaml")["RayCluster"]["spec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        (vol,) = [v for v in pod["volumes"] if v["name"] == "config"]
        assert vol == {"name": "config", "secret": {"secretName": "pdllm-config"}}
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "config"]
        assert mount["mountPath"] == "/etc/pdllm" and mount["readOnly"] is True
