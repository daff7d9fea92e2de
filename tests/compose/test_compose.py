"""compose/: the file is valid Compose, after interpolation with .env.example, and has what
a deployment needs: RabbitMQ (with management), Redis, PostgreSQL, the four services with
healthchecks on their real ports, and a GPU vLLM profile for a site agent.

Validation uses the Compose Specification's JSON schema, vendored as compose-spec.json:
compose-spec/compose-go `schema/compose-spec.json` as released in v2.13.0 (identical at
commit faa67b213c471d63997f55cc145e6eab9dc3630f, the file's last change; sha256
73ca5878c77570ba222a558016c7b3c6770ba5f3377786593e32180666512f8f). compose-go is the
schema's upstream (compose-spec/compose-spec keeps a draft-07 copy) and what Docker
Compose v2 validates with. No Docker engine or compose binary is needed.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.main import get_command

from services.accounting.settings import Settings as AccountingSettings
from services.cli import app as cli_app
from services.gateway.settings import Settings as GatewaySettings
from services.router.settings import Settings as RouterSettings
from services.site_agent.settings import Settings as SiteAgentSettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose"
SCHEMA = Path(__file__).with_name("compose-spec.json")

# service -> (CLI command, env prefix, default port)
FIRST_SERVICES = {
    "gateway": ("gateway", "FIRST_GATEWAY_", GatewaySettings.model_fields["port"].default),
    "batch-worker": (
        "batch-worker",
        "FIRST_GATEWAY_BATCH_WORKER_",
        GatewaySettings.model_fields["batch_worker_port"].default,
    ),
    "router": ("router", "FIRST_ROUTER_", RouterSettings.model_fields["port"].default),
    "accounting": (
        "accounting",
        "FIRST_ACCOUNTING_",
        AccountingSettings.model_fields["port"].default,
    ),
    "site-agent": (
        "site-agent",
        "FIRST_SITE_AGENT_",
        SiteAgentSettings.model_fields["port"].default,
    ),
}

# Compose interpolation: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e}, ${VAR:+r}…
_REFERENCE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a dotenv file as Compose does for plain KEY=VALUE lines (quotes stripped)."""
    env: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{number} is not KEY=VALUE: {raw!r}"
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path.name}:{number}: bad key"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


def interpolate(text: str, env: dict[str, str], used: set[str]) -> str:
    """Substitute variables as Compose does; record each name in `used`."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        used.add(name)
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        unset_or_empty = not value
        if op in (":-", "-"):
            missing = unset_or_empty if op == ":-" else value is None
            return interpolate(arg, env, used) if missing else str(value)
        if op in (":?", "?"):
            missing = unset_or_empty if op == ":?" else value is None
            if missing:
                raise ValueError(f"required variable {name} is missing: {arg}")
            return str(value)
        if op in (":+", "+"):
            present = not unset_or_empty if op == ":+" else value is not None
            return interpolate(arg, env, used) if present else ""
        return value or ""

    return _REFERENCE.sub(substitute, text)


def interpolate_tree(node: Any, env: dict[str, str], used: set[str]) -> Any:
    """Interpolate every string value (not keys) of a parsed Compose file."""
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env, used) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(value, env, used) for value in node]
    if isinstance(node, str):
        return interpolate(node, env, used)
    return node


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return read_env_file(COMPOSE / ".env.example")


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    loaded = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def used() -> set[str]:
    return set()


@pytest.fixture(scope="module")
def project(raw: dict[str, Any], env: dict[str, str], used: set[str]) -> dict[str, Any]:
    """The compose file as `docker compose --env-file .env.example config` would see it."""
    resolved: dict[str, Any] = interpolate_tree(raw, env, used)
    return resolved


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def errors_of(validator: jsonschema.protocols.Validator, document: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def test_the_vendored_schema_is_the_compose_specification(
    validator: jsonschema.protocols.Validator,
) -> None:
    schema = validator.schema
    assert schema["title"] == "Compose Specification"
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert {"services", "volumes", "networks", "secrets", "configs"} <= set(schema["properties"])


def test_the_compose_file_is_valid_against_the_compose_specification(
    validator: jsonschema.protocols.Validator, project: dict[str, Any]
) -> None:
    assert errors_of(validator, project) == []


def test_the_validation_catches_what_compose_would_refuse(
    validator: jsonschema.protocols.Validator, project: dict[str, Any]
) -> None:
    broken = copy.deepcopy(project)
    broken["services"]["router"]["healthcheck"]["intervall"] = "10s"
    broken["services"]["redis"]["depends_on"] = {"postgres": {"condition": "service_up"}}
    broken["services"]["gateway"]["ports"] = [True]
    found = errors_of(validator, broken)
    assert any("services/router/healthcheck" in e and "intervall" in e for e in found), found
    assert any("services/redis/depends_on" in e for e in found), found
    assert any("services/gateway/ports" in e for e in found), found


def test_every_variable_the_file_uses_is_defined_in_env_example(
    project: dict[str, Any], used: set[str], env: dict[str, str]
) -> None:
    assert used, "the file uses no variable: the interpolation did not run"
    assert sorted(used - set(env)) == []
    assert "${" not in json.dumps(project)


def test_rabbitmq_redis_and_postgres_are_there_with_healthchecks(
    project: dict[str, Any],
) -> None:
    services = project["services"]
    assert re.fullmatch(r"rabbitmq:[\w.-]*management[\w.-]*", services["rabbitmq"]["image"])
    assert re.fullmatch(r"redis:[\w.-]+", services["redis"]["image"])
    assert re.fullmatch(r"postgres:[\w.-]+", services["postgres"]["image"])
    for name in ("rabbitmq", "redis", "postgres"):
        assert services[name]["healthcheck"]["test"], name
        assert "profiles" not in services[name], name
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command
    assert "--appendfsync everysec" in redis_command  # DESIGN: append-only, fsync every second


def _ready_port(healthcheck: dict[str, Any]) -> int:
    test = healthcheck["test"]
    command = " ".join(test[1:]) if test[0] in ("CMD", "CMD-SHELL") else test
    match = re.search(r"http://127\.0\.0\.1:(\d+)/ready", command)
    assert match, f"the healthcheck does not ask /ready: {shlex.join(test)}"
    return int(match[1])


@pytest.mark.parametrize("name", sorted(FIRST_SERVICES))
def test_each_first_service_runs_its_cli_command_with_a_healthcheck_on_its_port(
    project: dict[str, Any], env: dict[str, str], name: str
) -> None:
    command, prefix, default_port = FIRST_SERVICES[name]
    service = project["services"][name]
    assert service["build"]["dockerfile"] == "compose/Dockerfile"
    assert (COMPOSE / service["build"]["context"] / "compose/Dockerfile").is_file()
    assert service["command"] == ["first", command]
    assert command in get_command(cli_app).commands  # type: ignore[attr-defined]
    environment = {**env, **service.get("environment", {})}
    port = int(environment.get(f"{prefix}PORT", default_port))
    assert _ready_port(service["healthcheck"]) == port
    # Prometheus scrapes /metrics over the compose network: listen beyond loopback.
    assert environment.get(f"{prefix}HOST") == "0.0.0.0"
    assert environment["FIRST_RABBIT_URL"].startswith("amqp://")
    assert environment["FIRST_REDIS_URL"] == "redis://redis:6379/0"
    for dependency in ("rabbitmq", "redis"):
        assert service["depends_on"][dependency] == {"condition": "service_healthy"}


def test_gateway_and_accounting_share_the_postgresql_ledger(
    project: dict[str, Any], env: dict[str, str]
) -> None:
    services = project["services"]
    expected = (
        f"postgresql://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{env['POSTGRES_DB']}"
    )
    for name in ("gateway", "accounting", "batch-worker"):
        assert services[name]["environment"]["FIRST_ACCOUNTING_DATABASE_URL"] == expected
        assert services[name]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert services["gateway"]["ports"] == [f"{env['GATEWAY_PORT']}:8000"]
    # The batch worker reads the files the gateway took and writes the results it serves.
    for name in ("gateway", "batch-worker"):
        assert services[name]["environment"]["FIRST_GATEWAY_BATCH_DIR"] == "/data/files"
        assert services[name]["volumes"] == ["files:/data/files"]
    assert "files" in project["volumes"]


def test_the_gpu_profile_runs_vllm_on_a_gpu_next_to_a_site_agent(
    project: dict[str, Any], env: dict[str, str]
) -> None:
    services = project["services"]
    vllm = services["vllm"]
    assert vllm["profiles"] == ["gpu"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] for device in devices)
    assert vllm["healthcheck"]["test"]
    args = vllm["command"]
    served = args[args.index("--served-model-name") + 1]
    port = args[args.index("--port") + 1]
    assert served == env["VLLM_SERVED_NAME"]

    agent = services["site-agent"]
    assert agent["profiles"] == ["gpu"]
    assert agent["depends_on"]["vllm"] == {"condition": "service_healthy"}
    backends = json.loads(agent["environment"]["FIRST_SITE_AGENT_BACKENDS"])
    assert backends == {served: [f"http://vllm:{port}"]}
    catalogue = json.loads(env["FIRST_ACCESS_MODELS"])
    assert served in {model["name"] for model in catalogue}  # the gateway offers it


def test_the_services_image_logs_json_and_installs_the_project() -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    assert "ENV FIRST_LOG_JSON=true" in dockerfile
    assert re.search(r"^RUN pip install .*\s\.$", dockerfile, re.MULTILINE)
    for path in re.findall(r"^COPY (\S+)", dockerfile, re.MULTILINE):
        assert (REPO / path).exists(), path
