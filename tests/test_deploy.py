"""deploy/ as written: every manifest and the compose file parse, and agree with the code and with each other.

No Docker engine or cluster: the checks are on the files -- images built by the Dockerfiles here, env
names the settings model reads, probes that run the farm's own readiness command, grace periods that
cover a job plus the worker's drain, KEDA triggers that read the farm's demand keys.
"""

from __future__ import annotations

import re
import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from click.testing import CliRunner

from scheduler.cli import main
from scheduler.core import keys, worker_registry
from scheduler.core.keys import Hop, Stage
from scheduler.core.settings import ENV_VARS, FarmSettings, load_settings
from scheduler.ops.cron import load_cron_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBE = DEPLOY / "kubernetes"
# Env vars that are not settings but that reelfarm reads: the settings file, a worker's metrics port.
OTHER_ENV = {"REELFARM_CONFIG", "REELFARM_METRICS_PORT"}
IMAGES = {"reelfarm:cpu": "Dockerfile.cpu", "reelfarm:cuda": "Dockerfile.cuda"}


def kube_docs() -> list[dict[str, Any]]:
    docs = [doc for path in sorted(KUBE.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs, "no Kubernetes manifests"
    return docs


def kube(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in kube_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"])


def env_names(container: dict[str, Any]) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def config_map_settings(tmp_path: Path) -> FarmSettings:
    path = tmp_path / "farm.yaml"
    path.write_text(kube("ConfigMap", "reelfarm")["data"]["farm.yaml"])
    return load_settings(path, env={})


def test_every_manifest_parses_and_names_itself() -> None:
    for doc in kube_docs():
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
        assert doc["metadata"]["name"].startswith("reelfarm"), doc["metadata"]
    assert set(compose()["services"]) >= {"valkey", "minio", "model", *(s.value for s in Stage)}


def test_images_are_the_ones_the_dockerfiles_build() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for image, dockerfile in IMAGES.items():
        text = (DEPLOY / "docker" / dockerfile).read_text()
        for source in re.findall(r"^COPY (\S+)", text, re.M):
            assert (REPO / source).exists(), f"{dockerfile} copies {source}, which does not exist"
        (extra,) = re.findall(r'pip install [^\n]*"\.\[([\w-]+)\]"', text)
        assert extra in extras, f"{dockerfile} installs the extra {extra!r}, not in pyproject.toml"
        mooncake = [d for d in extras[extra] if d.startswith("mooncake")]
        wanted = "mooncake-transfer-engine-cuda13" if image.endswith("cuda") else "mooncake-transfer-engine-non-cuda"
        assert [m.split(">")[0] for m in mooncake] == [wanted]
        assert "USER 10001" in text and 'CMD ["reelfarm"' in text
    used = {c["image"] for d in kube_docs() if d["kind"] == "Deployment" for c in containers(d)}
    assert used == set(IMAGES), used
    for name, service in compose()["services"].items():
        if service.get("image", "").startswith("reelfarm"):
            build = service["build"]
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), name
            assert IMAGES[service["image"]] == Path(build["dockerfile"]).name


def test_env_names_are_settings_and_secret_references_resolve() -> None:
    known = set(ENV_VARS) | OTHER_ENV
    secret = kube("Secret", "reelfarm")["stringData"]
    config_map = kube("ConfigMap", "reelfarm")["data"]
    for doc in kube_docs():
        if doc["kind"] != "Deployment":
            continue
        for container in containers(doc):
            unknown = {n for n in env_names(container) if n.startswith("REELFARM_")} - known
            assert not unknown, f"{doc['metadata']['name']}: env {unknown} is no setting (scheduler/core/settings.py)"
            for entry in container["env"]:
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "reelfarm" and ref["key"] in secret, entry
        for volume in doc["spec"]["template"]["spec"]["volumes"]:
            if "configMap" in volume:
                assert volume["configMap"]["name"] == "reelfarm"
            if "secret" in volume:
                assert all(item["key"] in secret for item in volume["secret"]["items"])
    for ref in kube("TriggerAuthentication", "reelfarm-redis")["spec"]["secretTargetRef"]:
        assert ref["name"] == "reelfarm" and ref["key"] in secret, ref
    assert {"farm.yaml", "cron.yaml"} <= set(config_map)
    for name, service in compose()["services"].items():
        unknown = {n for n in service.get("environment", {}) if n.startswith("REELFARM_")} - known
        assert not unknown, f"compose service {name}: env {unknown} is no setting"
    unit = (DEPLOY / "systemd" / "reelfarm-worker@.service").read_text()
    assert set(re.findall(r"REELFARM_\w+", unit)) <= known


def test_config_map_is_valid_farm_settings_and_cron_schedules(tmp_path: Path) -> None:
    settings = config_map_settings(tmp_path)
    assert settings.worker.device == "cuda"
    cron_file = tmp_path / "cron.yaml"
    cron_file.write_text(kube("ConfigMap", "reelfarm")["data"]["cron.yaml"])
    config, _ = load_cron_config(cron_file)
    assert config.schedules
    cron = kube("Deployment", "reelfarm-cron")
    (container,) = containers(cron)
    assert container["command"][:2] == ["reelfarm", "cron"] and "/etc/reelfarm/cron.yaml" in container["command"]


@pytest.mark.parametrize("expert", ["high", "low"])
def test_each_wan22_expert_has_its_own_workers_scaled_on_its_hops_demand(expert: str) -> None:
    deployment = kube("Deployment", f"reelfarm-transform-{expert}")
    pod = deployment["spec"]["template"]
    (worker,) = containers(deployment)
    assert worker["command"] == ["reelfarm", "worker", "transform", "--expert", expert]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # Its pods are not the plain transform Deployment's (overlapping selectors would let one adopt the other's).
    plain = kube("Deployment", "reelfarm-transform")["spec"]["selector"]["matchLabels"]
    assert not plain.items() <= pod["metadata"]["labels"].items()
    pdb = kube("PodDisruptionBudget", f"reelfarm-transform-{expert}")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    scaled = kube("ScaledObject", f"reelfarm-transform-{expert}")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["metadata"]["listName"] == keys.demand_key(Hop(f"transform@{expert}"))
    policy = kube("NetworkPolicy", "reelfarm-transfer-only-between-workers")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


@pytest.mark.parametrize("stage", [s.value for s in Stage])
def test_stage_deployment_probe_grace_gpu_pdb_and_autoscaling(stage: str, tmp_path: Path) -> None:
    deployment = kube("Deployment", f"reelfarm-{stage}")
    pod = deployment["spec"]["template"]
    (worker,) = containers(deployment)
    assert worker["command"] == ["reelfarm", "worker", stage]
    assert worker["readinessProbe"]["exec"]["command"] == ["reelfarm", "worker-ready", stage]
    hostname = next(e for e in worker["env"] if e["name"] == "REELFARM_TRANSFER_HOSTNAME")
    assert hostname["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert {"REELFARM_SECRET", "REELFARM_REDIS_URL", "REELFARM_CONFIG"} <= env_names(worker)
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1 == worker["resources"]["limits"]["nvidia.com/gpu"]
    # Grace = the longest job + the drain of held outputs, so a stopping worker is never cut off mid-job.
    max_job = int(deployment["metadata"]["annotations"]["reelfarm/max-job-seconds"])
    drain = config_map_settings(tmp_path).worker.shutdown_grace_seconds
    assert pod["spec"]["terminationGracePeriodSeconds"] == max_job + drain
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()

    pdb = kube("PodDisruptionBudget", f"reelfarm-{stage}")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pdb["spec"]["maxUnavailable"] == 1

    scaled = kube("ScaledObject", f"reelfarm-{stage}")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == keys.demand_key(Stage(stage))
    assert int(trigger["metadata"]["listLength"]) >= 1
    kube("TriggerAuthentication", trigger["authenticationRef"]["name"])

    policy = kube("NetworkPolicy", "reelfarm-transfer-only-between-workers")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


@pytest.mark.parametrize("stage", [s.value for s in Stage])
def test_compose_stage_service(stage: str) -> None:
    service = compose()["services"][stage]
    assert service["command"] == ["reelfarm", "worker", stage]
    assert service["healthcheck"]["test"] == ["CMD", "reelfarm", "worker-ready", stage]
    # The advertised address is the service's own name on the compose network.
    assert service["environment"]["REELFARM_TRANSFER_HOSTNAME"] == service["hostname"] == stage
    assert {"valkey", "minio", "model"} <= set(service["depends_on"])
    assert service["environment"]["REELFARM_MODEL_DIR"].startswith("/models/")
    grace = int(service["stop_grace_period"].removesuffix("s"))
    max_job = int(service["labels"]["reelfarm.max_job_seconds"])
    assert grace == max_job + FarmSettings().worker.shutdown_grace_seconds
    assert "ports" not in service, "workers publish nothing to the host"
    unit = (DEPLOY / "systemd" / "reelfarm-worker@.service").read_text()
    assert int(re.findall(r"TimeoutStopSec=(\d+)", unit)[0]) > FarmSettings().worker.shutdown_grace_seconds


def test_every_deploy_path_mentioned_exists() -> None:
    texts = [REPO / "README.md", *DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("Dockerfile.*")]
    for path in texts:
        for mentioned in re.findall(r"\bdeploy/[\w./@-]*\w", path.read_text()):
            assert (REPO / mentioned).exists(), f"{path.relative_to(REPO)} mentions {mentioned}, which does not exist"


def test_readme_walkthrough_uses_real_commands() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Deploying", 1)[1].split("\n## ", 1)[0]
    mentioned = set(re.findall(r"\breelfarm ([a-z][a-z-]+)", section))
    assert {"up", "submit", "wait", "worker-ready", "cron"} <= mentioned
    assert mentioned <= set(main.commands), (
        f"the Deploying section names commands that do not exist: {mentioned - set(main.commands)}"
    )
    assert "reelfarm:demand:STAGE" in section and keys.demand_key(Stage.ENCODE) == "reelfarm:demand:encode"


def test_worker_ready_probe_follows_this_hosts_registration(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REELFARM_REDIS_URL", redis_url)
    runner = CliRunner()
    not_yet = runner.invoke(main, ["worker-ready", "encode"])
    assert not_yet.exit_code == 1 and f"no live encode worker registered from host {socket.gethostname()}" in (
        not_yet.output
    )
    conn = redis.Redis.from_url(redis_url)
    record = {"stage": "encode", "endpoint": "10.0.0.5:15001", "host": socket.gethostname()}
    worker_registry.register_worker(conn, "encode-pod-1", record, ttl_seconds=30)
    worker_registry.register_worker(conn, "transform-elsewhere", {**record, "stage": "transform", "host": "x"}, 30)
    ready = runner.invoke(main, ["worker-ready", "encode"])
    assert ready.exit_code == 0 and "encode-pod-1" in ready.output
    # Another host's worker does not make this pod ready.
    assert runner.invoke(main, ["worker-ready", "transform"]).exit_code == 1
    # A worker whose heartbeats stopped (record expired) is not ready.
    conn.delete(keys.worker_key("encode-pod-1"))
    assert runner.invoke(main, ["worker-ready", "encode"]).exit_code == 1


def test_http_front_deployment_probes_healthz_and_takes_its_key_from_the_secret() -> None:
    deployment, service = kube("Deployment", "reelfarm-http"), kube("Service", "reelfarm-http")
    (container,) = containers(deployment)
    assert container["command"] == ["reelfarm", "serve"] and container["image"] == "reelfarm:cpu"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in container["env"]}
    assert env["REELFARM_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] in kube("Secret", "reelfarm")["stringData"]
    # Reachable in the cluster only: a ClusterIP on the port the container listens on.
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"][0]["port"] == int(env["REELFARM_HTTP_PORT"]["value"])
    http = compose()["services"]["http"]
    assert http["command"] == ["reelfarm", "serve"] and all(p.startswith("127.0.0.1:") for p in http["ports"])
