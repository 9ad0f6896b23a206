"""Dockerfile, docker-compose.yml and deploy/kubernetes/ agree with the gateway (no Docker engine needed)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from gateway.app import create_app
from gateway.config import GatewayConfig, ServerConfig, parse_config

ROOT = Path(__file__).resolve().parents[2]  # tests/unit/ -> the checkout
KUBERNETES = ROOT / "deploy" / "kubernetes"
CONFIG_PATH = "/etc/gateway/gateway.yaml"
PREFIX = ServerConfig().prefix
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-|:\?|\?)?")


def _required_vars(text: str) -> set[str]:
    """${VAR} names without a default (a default is ${VAR:-x})."""
    return {name for name, op in _VAR.findall(text) if op != ":-"}


async def _internal_status(prefix: str, path: str) -> int:
    """Status of an internal endpoint of an in-process gateway (memory store) at that prefix."""
    config = parse_config(
        {
            "server": {"prefix": prefix},
            "tokens": {"algorithms": ["HS256"], "secret": "x" * 32},
            "routes": [{"name": "app", "path": "/", "upstream": "http://127.0.0.1:9"}],
        }
    )
    transport = httpx.ASGITransport(app=create_app(config))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        return (await client.get(path)).status_code


# --- Dockerfile ---------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def test_dockerfile_is_multi_stage_and_runs_as_non_root() -> None:
    steps = _dockerfile()
    stages = [args for op, args in steps if op == "FROM"]
    assert len(stages) >= 2 and all("slim" in s for s in stages)
    assert any("--from=" in args for op, args in steps if op == "COPY")
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    # The last USER comes after every RUN: nothing later needs root.
    last_user = max(i for i, (op, _) in enumerate(steps) if op == "USER")
    assert all(op != "RUN" for op, _ in steps[last_user:])


def test_dockerfile_serves_on_8080_with_the_mounted_config() -> None:
    steps = _dockerfile()
    assert ("EXPOSE", "8080") in steps
    env = " ".join(args for op, args in steps if op == "ENV")
    assert f"GATEWAY_CONFIG={CONFIG_PATH}" in env
    (cmd,) = [json.loads(args) for op, args in steps if op == "CMD"]
    assert cmd == ["gateway", "serve", "--host", "0.0.0.0", "--port", "8080"]


async def test_dockerfile_healthcheck_probes_the_health_endpoint() -> None:
    (check,) = [args for op, args in _dockerfile() if op == "HEALTHCHECK"]
    command = json.loads(check.split("CMD", 1)[1])
    assert command[0] == "python"  # slim images have no curl
    (url,) = re.findall(r"https?://[^'\"]+", " ".join(command))
    assert url == f"http://127.0.0.1:8080{PREFIX}/health"
    assert await _internal_status(PREFIX, f"{PREFIX}/health") == 200


# --- docker-compose.yml -------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (document,) = list(yaml.safe_load_all((ROOT / "docker-compose.yml").read_text(encoding="utf-8")))
    services: dict[str, Any] = document["services"]
    return services


def _command(service: dict[str, Any]) -> str:
    command = service.get("command", [])
    return command if isinstance(command, str) else shlex.join(command)


def test_compose_runs_two_gateways_redis_an_idp_and_an_upstream(compose: dict[str, Any]) -> None:
    gateways = {name: s for name, s in compose.items() if _command(s).startswith("gateway serve")}
    assert len(gateways) >= 2
    assert len({s["ports"][0].split(":")[-2] for s in gateways.values()}) == len(gateways)  # distinct host ports
    assert compose["redis"]["image"].startswith("redis:")
    assert "gateway.demo.upstream" in _command(compose["upstream"])
    assert "gateway.demo.idp" in _command(compose["idp"])
    for service in compose.values():
        assert "healthcheck" in service or service.get("image") == "gateway:local"  # the image's HEALTHCHECK
        if service.get("image") == "gateway:local":
            assert service.get("build") == ".", "built here, never pulled"
    for gateway in gateways.values():
        for dependency, condition in gateway["depends_on"].items():
            assert condition == {"condition": "service_healthy"}
            assert "healthcheck" in compose[dependency], dependency


def test_compose_demo_services_override_the_gateway_healthcheck(compose: dict[str, Any]) -> None:
    # They run from the gateway image, whose HEALTHCHECK probes port 8080: they must bring their own.
    for name in ("idp", "upstream"):
        port = re.search(r"--port\s+(\d+)", _command(compose[name]))
        assert port is not None
        assert f"127.0.0.1:{port.group(1)}/" in " ".join(compose[name]["healthcheck"]["test"])


def test_compose_config_is_mounted_and_valid(compose: dict[str, Any]) -> None:
    env_example = (ROOT / ".env.example").read_text(encoding="utf-8")
    dotenv = dict(line.split("=", 1) for line in env_example.splitlines() if line and not line.startswith("#"))
    compose_text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    assert _required_vars(compose_text) <= set(dotenv), "every ${VAR} compose needs is in .env.example"
    ports = {name: re.search(r"--port\s+(\d+)", _command(compose[name])) for name in ("idp", "upstream")}
    for name, service in compose.items():
        if not _command(service).startswith("gateway serve"):
            continue
        (mount,) = [v for v in service["volumes"] if v.split(":")[1] == CONFIG_PATH]
        source = ROOT / mount.split(":")[0]
        assert mount.endswith(":ro") and source.is_file()
        environment = {k: str(v) for k, v in service["environment"].items()}
        assert environment["GATEWAY_CONFIG"] == CONFIG_PATH
        # Secrets are compose variables from .env, never literal values.
        for key in ("JWT_SECRET", "GATEWAY_SECRET"):
            assert environment[key].startswith(f"${{{key}:?")
        env = {**environment, **dotenv}
        config = parse_config(yaml.safe_load(source.read_text(encoding="utf-8")), env=env)
        assert _required_vars(source.read_text(encoding="utf-8")) <= set(env), name
        assert urlsplit(config.store.url).hostname in compose and "image" in compose["redis"]
        upstreams = {r.upstream for r in config.routes}
        assert upstreams <= {f"http://{s}:{p.group(1)}" for s, p in ports.items() if p}, upstreams
        assert config.refresh.endpoint is not None and config.refresh.endpoint.startswith("http://idp:")
        assert f"--issuer {config.tokens.issuer}" in _command(compose["idp"])


# --- deploy/kubernetes --------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object in deploy/kubernetes, by kind (one of each)."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document is None or document.get("kind") == "Kustomization":
                continue
            assert document["apiVersion"] and document["metadata"]["name"], path.name
            assert document["kind"] not in objects, f"{path.name}: a second {document['kind']}"
            objects[document["kind"]] = document
    return objects


def _container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def _configmap_config(manifests: dict[str, dict[str, Any]]) -> GatewayConfig:
    text = manifests["ConfigMap"]["data"]["gateway.yaml"]
    return parse_config(yaml.safe_load(text), env=manifests["Secret"]["stringData"])


def test_kubernetes_has_the_expected_objects(manifests: dict[str, dict[str, Any]]) -> None:
    assert set(manifests) == {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"}
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text(encoding="utf-8"))
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in KUBERNETES.glob("*.yaml") if p.stem != "kustomization"
    )


def test_kubernetes_configmap_config_is_valid_with_the_secret(manifests: dict[str, dict[str, Any]]) -> None:
    text = manifests["ConfigMap"]["data"]["gateway.yaml"]
    secret = manifests["Secret"]["stringData"]
    assert _required_vars(text) <= set(secret)
    assert all("REPLACE_ME" in value for value in secret.values()), "the Secret holds placeholders only"
    config = _configmap_config(manifests)
    assert not config.store.url.startswith("memory:")  # two replicas share one store


def test_kubernetes_deployment_mounts_config_and_secret(manifests: dict[str, dict[str, Any]]) -> None:
    deployment = manifests["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(manifests)
    assert deployment["spec"]["replicas"] >= 2
    assert container["args"][:2] == ["gateway", "serve"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env["GATEWAY_CONFIG"] == CONFIG_PATH
    (mount,) = [m for m in container["volumeMounts"] if CONFIG_PATH.startswith(m["mountPath"] + "/")]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == manifests["ConfigMap"]["metadata"]["name"]
    assert Path(CONFIG_PATH).name in manifests["ConfigMap"]["data"]
    (secret_ref,) = container["envFrom"]
    assert secret_ref["secretRef"]["name"] == manifests["Secret"]["metadata"]["name"]


def test_kubernetes_pod_is_locked_down(manifests: dict[str, dict[str, Any]]) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    container = _container(manifests)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


async def test_kubernetes_probes_hit_internal_endpoints(manifests: dict[str, dict[str, Any]]) -> None:
    container = _container(manifests)
    prefix = _configmap_config(manifests).server.prefix
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (ready["path"], live["path"]) == (f"{prefix}/ready", f"{prefix}/health")
    (port,) = container["ports"]
    assert port["containerPort"] == 8080 and ready["port"] == live["port"] == port["name"]
    assert await _internal_status(prefix, ready["path"]) == 200
    assert await _internal_status(prefix, live["path"]) == 200


def test_kubernetes_service_and_pdb_select_the_pods(manifests: dict[str, dict[str, Any]]) -> None:
    labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert manifests["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = manifests["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    (port,) = service["ports"]
    assert port["targetPort"] == _container(manifests)["ports"][0]["name"]
    assert manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert manifests["PodDisruptionBudget"]["spec"]["minAvailable"] < manifests["Deployment"]["spec"]["replicas"]
