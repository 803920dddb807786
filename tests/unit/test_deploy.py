"""The deployment files: Dockerfile, docker-compose.yml and deploy/kubernetes/*.

No Docker engine or cluster is needed: the files are parsed with yaml and checked
for what production relies on (KRaft, passwords and volumes, replicas, probes,
limits, start order), every ``METERSTREAM_*`` name is checked against the real
``Settings`` fields (and every value against their types), and ``docker-compose
config`` validates the compose file where the binary is installed.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meterstream.meters.config import parse_meters
from meterstream.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
K8S_DIR = ROOT / "deploy" / "kubernetes"
PREFIX = "METERSTREAM_"
# ${VAR}, ${VAR:-default}, ${VAR-default}: the forms docker-compose 1.x and 2.x share.
INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?-)(?P<default>[^}]*))?\}")


def resolve(value: Any, env: dict[str, str] | None = None) -> str:
    """A compose value as compose would interpolate it with ``env`` (defaults otherwise)."""
    env = env or {}

    def sub(match: re.Match[str]) -> str:
        name, op, default = match.group("name"), match.group("op"), match.group("default")
        current = env.get(name)
        if current is None or (op == ":-" and current == ""):
            return default or ""
        return current

    # "$$" is compose's escape for a literal "$" (left for the container's shell).
    return "$".join(INTERPOLATION.sub(sub, part) for part in str(value).split("$$"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def k8s_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    """Every manifest by (kind, name)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path, doc in k8s_documents():
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in found, f"{path.name}: duplicate {key}"
        assert "namespace" not in doc["metadata"], f"{path.name}: manifests are namespace-agnostic"
        found[key] = doc
    return found


def of_kind(k8s: dict[tuple[str, str], dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for (k, _), doc in k8s.items() if k == kind]


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_runs_meterstream_worker_as_non_root() -> None:
    instructions = dockerfile_instructions()
    froms = [rest for word, rest in instructions if word == "FROM"]
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest)
    bases = {args.get(f.split()[0].strip("${}"), f.split()[0]) for f in froms}
    assert bases == {"python:3.11-slim"}
    users = [rest for word, rest in instructions if word == "USER"]
    assert users, "the image must switch to a non-root user"
    assert users[-1].split(":")[0] not in ("root", "0")
    last = {word: rest for word, rest in instructions}
    assert last["ENTRYPOINT"] == '["meterstream"]'
    assert last["CMD"] == '["worker"]'
    assert "/healthz" in last["HEALTHCHECK"]
    installs = " ".join(rest for word, rest in instructions if word == "RUN")
    # Exactly the runtime lock, hash-checked (tests/unit/test_lock.py: rocksdb, no embedded),
    # then meterstream with nothing resolved beyond the lock.
    assert "pip install --require-hashes -r requirements/runtime.txt" in installs
    assert "pip install --no-deps --no-build-isolation ." in installs
    assert "embedded" not in installs and "pip install --upgrade" not in installs
    copies = [rest.split() for word, rest in instructions if word == "COPY"]
    assert ["requirements/runtime.txt", "./requirements/runtime.txt"] in copies


def test_dockerfile_exposes_the_web_port_it_configures() -> None:
    instructions = dockerfile_instructions()
    expose = {rest for word, rest in instructions if word == "EXPOSE"}
    env_text = " ".join(rest for word, rest in instructions if word == "ENV")
    env = dict(shlex.split(pair)[0].split("=", 1) for pair in env_text.split() if "=" in pair)
    assert expose == {env["METERSTREAM_WEB_PORT"]}
    assert env["METERSTREAM_WEB_HOST"] == "0.0.0.0"
    Settings(**settings_kwargs(env))  # every ENV default is a valid setting


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".meterstream", "tests"} <= ignored
    assert "README.md" not in ignored  # pyproject's readme: needed by the build
    assert not {"requirements", "requirements/", "requirements/runtime.txt", "*.txt"} & ignored


# ---------------------------------------------------------------- docker-compose.yml


def test_compose_kafka_is_one_kraft_broker_ready_for_transactions(
    services: dict[str, dict[str, Any]],
) -> None:
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = environment(kafka)
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    # A KRaft cluster id is a UUID: 16 bytes, base64url without padding (22 characters).
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert int(env["KAFKA_NUM_PARTITIONS"]) >= 1
    # exactly_once on one broker: the transaction log and offsets topic must fit on it.
    for key in (
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_MIN_INSYNC_REPLICAS",
        "KAFKA_DEFAULT_REPLICATION_FACTOR",
    ):
        assert env[key] == "1", key
    assert int(env["KAFKA_LOG_RETENTION_HOURS"]) * 3600 >= Settings().dedup_horizon_seconds
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert any(v.split(":")[0] == "kafka-data" for v in kafka["volumes"])


def test_compose_clickhouse_has_a_password_and_a_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    ch = services["clickhouse"]
    assert ch["image"].startswith("clickhouse/clickhouse-server:")
    env = environment(ch)
    assert env["CLICKHOUSE_USER"]
    assert resolve(env["CLICKHOUSE_PASSWORD"])
    assert resolve(env["CLICKHOUSE_PASSWORD"], {"CLICKHOUSE_PASSWORD": "s3cret"}) == "s3cret"
    data = [v for v in ch["volumes"] if v.split(":")[1] == "/var/lib/clickhouse"]
    assert data and data[0].split(":")[0] in compose["volumes"]
    # The workers log in as that user with that password.
    worker = environment(services["worker"])
    assert worker["METERSTREAM_CLICKHOUSE_USER"] == env["CLICKHOUSE_USER"]
    assert worker["METERSTREAM_CLICKHOUSE_PASSWORD"] == env["CLICKHOUSE_PASSWORD"]
    assert worker["METERSTREAM_CLICKHOUSE_DATABASE"] == env["CLICKHOUSE_DB"]


def test_compose_runs_two_scalable_workers(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert worker["deploy"]["replicas"] == 2
    assert "build" in worker
    assert "container_name" not in worker and "ports" not in worker  # 2 replicas must fit
    env = environment(worker)
    assert env["METERSTREAM_PROCESSING_GUARANTEE"] == "exactly_once"
    assert env["METERSTREAM_STORE"] == "rocksdb"
    assert resolve(env["METERSTREAM_PARTITIONS"]) == "8"
    assert env["METERSTREAM_STRIPE_API_KEY"] == "${STRIPE_API_KEY:-}"
    assert env["METERSTREAM_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in worker["volumes"]}
    assert mounts[env["METERSTREAM_METERS_FILE"]] == "./meters.example.yaml"
    assert (ROOT / "meters.example.yaml").exists()


def test_compose_healthchecks_and_start_order(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
    assert "/healthz" in " ".join(services["worker"]["healthcheck"]["test"])
    depends = services["worker"]["depends_on"]
    assert set(depends) == {"kafka", "clickhouse", "stripe-emulator"}
    for name, condition in depends.items():
        assert condition == {"condition": "service_healthy"}, name


def test_compose_emulator_serves_the_port_workers_use(services: dict[str, dict[str, Any]]) -> None:
    emulator = services["stripe-emulator"]
    command = " ".join(emulator.get("entrypoint") or []) + " " + " ".join(emulator["command"])
    assert "0.0.0.0" in command and "12111" in command
    assert environment(services["worker"])["STRIPE_EMULATOR_URL"] == (
        "http://stripe-emulator:12111"
    )
    assert services["worker"]["image"] == emulator["image"]


def run_worker_wrapper(
    services: dict[str, dict[str, Any]], tmp_path: Path, host_env: dict[str, str]
) -> dict[str, str]:
    """Run the worker's entrypoint script with a fake ``meterstream``; its Stripe env."""
    worker = services["worker"]
    assert worker["entrypoint"] == ["/bin/sh", "-c"]
    script = resolve(worker["command"][0], host_env)
    fake = tmp_path / "meterstream"
    fake.write_text('#!/bin/sh\necho "args=$*"\nenv | grep -E "^(METERSTREAM_)?STRIPE_" || true\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {k: resolve(v, host_env) for k, v in environment(worker).items()}
    env["PATH"] = f"{tmp_path}{os.pathsep}{os.environ['PATH']}"
    out = subprocess.run(
        ["/bin/sh", "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout
    lines = dict(line.split("=", 1) for line in out.splitlines())
    assert lines.pop("args") == "worker"
    return lines


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs /bin/sh")
def test_compose_stripe_key_or_emulator(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    no_key = run_worker_wrapper(services, tmp_path, {})
    assert "METERSTREAM_STRIPE_API_KEY" not in no_key  # unset, not empty: the emulator key
    assert no_key["METERSTREAM_STRIPE_API_BASE"] == "http://stripe-emulator:12111"
    assert Settings(**settings_kwargs(no_key)).stripe_api_key is None

    live = run_worker_wrapper(services, tmp_path, {"STRIPE_API_KEY": "sk_live_x"})
    assert live["METERSTREAM_STRIPE_API_KEY"] == "sk_live_x"
    assert "METERSTREAM_STRIPE_API_BASE" not in live  # Stripe's own hosts

    mock = run_worker_wrapper(
        services, tmp_path, {"STRIPE_API_KEY": "sk_test_x", "STRIPE_API_BASE": "http://mock:1"}
    )
    assert mock["METERSTREAM_STRIPE_API_BASE"] == "http://mock:1"


COMPOSE_NOT_INSTALLED = (
    "docker-compose binary not installed (apt-get install -y docker-compose); "
    "the compose file was only checked by parsing it"
)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason=COMPOSE_NOT_INSTALLED)
@pytest.mark.parametrize("stripe_key", ["", "sk_test_from_env"])
def test_docker_compose_config_accepts_the_file(stripe_key: str) -> None:
    env = {**os.environ, "STRIPE_API_KEY": stripe_key}
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- Kubernetes


def test_kubernetes_manifests_parse_and_kustomization_lists_them(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    kinds = {kind for kind, _ in k8s}
    assert {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"} <= kinds
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert "namespace" not in kustomization
    files = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_every_deployment_container_has_probes_and_limits(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployments = of_kind(k8s, "Deployment")
    assert deployments
    for deployment in deployments:
        spec = deployment["spec"]
        pod = spec["template"]["spec"]
        assert spec["replicas"] == 3
        assert spec["selector"]["matchLabels"].items() <= (
            spec["template"]["metadata"]["labels"].items()
        )
        # Long enough for a batch in flight to finish (up to 60 s) plus shutdown.
        assert pod["terminationGracePeriodSeconds"] >= 90
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            live = container["livenessProbe"]["httpGet"]
            ready = container["readinessProbe"]["httpGet"]
            assert live["path"] == "/healthz"
            assert ready["path"] == "/readyz"
            for probe in (live, ready, container["startupProbe"]["httpGet"]):
                assert probe["port"] in ports or probe["port"] in ports.values()
            resources = container["resources"]
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[section]), section
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_deployment_config_refs_mounts_and_web_port_agree(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = k8s[("Deployment", "meterstream")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env.update(k8s[("ConfigMap", source["configMapRef"]["name"])]["data"])
        else:
            env.update(k8s[("Secret", source["secretRef"]["name"])]["stringData"])
    assert int(env["METERSTREAM_WEB_PORT"]) == container["ports"][0]["containerPort"]
    assert env["METERSTREAM_WEB_HOST"] == "0.0.0.0"
    # The meters file the settings name is the ConfigMap key mounted there, and it loads.
    volumes = {v["name"]: v for v in pod["volumes"]}
    meters_path = Path(env["METERSTREAM_METERS_FILE"])
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == meters_path.parent]
    source = volumes[mount["name"]]["configMap"]
    (item,) = [i for i in source["items"] if i["path"] == meters_path.name]
    meters_text = k8s[("ConfigMap", source["name"])]["data"][item["key"]]
    assert parse_meters(yaml.safe_load(meters_text), source="meters ConfigMap").meters
    # State lives on a writable volume (the root file system is read-only).
    state_mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["METERSTREAM_STATE_DIR"] in state_mounts
    assert env["METERSTREAM_STORE_PATH"].startswith(env["METERSTREAM_STATE_DIR"] + "/")
    assert int(env["METERSTREAM_PARTITIONS"]) >= deployment["spec"]["replicas"]


def test_secret_holds_placeholders_only(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    secret = k8s[("Secret", "meterstream-secrets")]
    data = secret["stringData"]
    assert set(data) == {
        "METERSTREAM_STRIPE_API_KEY",
        "METERSTREAM_CLICKHOUSE_PASSWORD",
        "METERSTREAM_KAFKA_SASL_PASSWORD",
        "METERSTREAM_SQL_CLICKHOUSE_PASSWORD",
        "METERSTREAM_BILLING_LINK_SECRET",
        "METERSTREAM_CREDITS_WEBHOOK_SECRET",
        "METERSTREAM_STRIPE_WEBHOOK_SECRET",
    }
    assert all("REPLACE_ME" in value for value in data.values())
    secret_fields = {
        name for name, field in Settings.model_fields.items() if "SecretStr" in repr(field)
    } - {"api_key"}  # the key a CLI client sends to a worker; never a worker's own setting
    assert {k.removeprefix(PREFIX).lower() for k in data} == secret_fields
    # ...and no secret is in a ConfigMap.
    for configmap in of_kind(k8s, "ConfigMap"):
        assert not set(configmap["data"]) & set(data)


def test_api_keys_secret_is_mounted_where_the_settings_say(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    env = k8s[("ConfigMap", "meterstream-config")]["data"]
    keys_file = Path(env["METERSTREAM_API_KEYS_FILE"])
    (deployment,) = of_kind(k8s, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (mount,) = [
        m for m in pod["containers"][0]["volumeMounts"] if Path(m["mountPath"]) == keys_file.parent
    ]
    assert mount.get("readOnly") is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = k8s[("Secret", volume["secret"]["secretName"])]
    assert json.loads(secret["stringData"][keys_file.name]) == {"keys": []}  # no key shipped


def test_service_and_pdb_select_the_worker_pods(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    template = k8s[("Deployment", "meterstream")]["spec"]["template"]
    labels = template["metadata"]["labels"]
    (container,) = template["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    for service in of_kind(k8s, "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
        annotations = service["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
    for pdb in of_kind(k8s, "PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


# ---------------------------------------------------------------- settings names and values


def settings_kwargs(env: dict[str, str]) -> dict[str, Any]:
    return {k.removeprefix(PREFIX).lower(): v for k, v in env.items() if k.startswith(PREFIX)}


def deployment_env_names(k8s: dict[tuple[str, str], dict[str, Any]]) -> set[str]:
    names: set[str] = set()
    for (kind, _), doc in k8s.items():
        if kind == "ConfigMap":
            names |= {k for k in doc["data"] if k.startswith(PREFIX)}
        elif kind == "Secret":
            names |= set(doc.get("stringData") or {}) | set(doc.get("data") or {})
        elif kind == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                names |= {e["name"] for e in container.get("env", [])}
    return names


def test_every_setting_name_used_is_a_real_settings_field(
    services: dict[str, dict[str, Any]], k8s: dict[tuple[str, str], dict[str, Any]]
) -> None:
    used: dict[str, str] = {}
    for name, service in services.items():
        for key in environment(service):
            used[key] = f"docker-compose.yml {name}"
    for key in deployment_env_names(k8s):
        used[key] = "deploy/kubernetes"
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for key in re.findall(r"(METERSTREAM_\w+)=", rest):
                used[key] = "Dockerfile"
    fields = set(Settings.model_fields)
    unknown = {
        f"{key} ({where})"
        for key, where in used.items()
        if key.startswith(PREFIX) and key.removeprefix(PREFIX).lower() not in fields
    }
    assert not unknown, f"not a Settings field: {sorted(unknown)}"
    assert sum(k.startswith(PREFIX) for k in used) >= 20


def test_setting_values_are_valid_settings(
    services: dict[str, dict[str, Any]], k8s: dict[tuple[str, str], dict[str, Any]]
) -> None:
    worker = {k: resolve(v) for k, v in environment(services["worker"]).items()}
    Settings(**settings_kwargs(worker))
    env: dict[str, str] = {}
    for configmap in of_kind(k8s, "ConfigMap"):
        env.update({k: v for k, v in configmap["data"].items() if k.startswith(PREFIX)})
    for secret in of_kind(k8s, "Secret"):
        env.update(secret["stringData"])
    settings = Settings(**settings_kwargs(env))
    assert settings.processing_guarantee == "exactly_once"
    assert settings.store == "rocksdb"
    assert settings.kafka_sasl_password is not None
    assert "REPLACE_ME" not in repr(settings)  # secrets stay masked
