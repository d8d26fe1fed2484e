"""The container deployment stays true to the code.

No Docker engine runs here: these tests read the Dockerfile and docker-compose.yml and
check them against the CLI parser, the health routes and the rules of the service
(migrate first, no torch in the API image, a GPU for the worker, psycopg for PostgreSQL).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.settings import Settings
from cli import exposure
from cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"

EXPECTED_SERVICES = {"postgres", "redis", "migrate", "api", "worker", "files-worker"}
BUILT_FROM_THIS_REPO = {"migrate", "api", "worker", "files-worker"}


# ---- reading the Dockerfile


@dataclass
class Stage:
    name: str | None
    image: str
    parent: Stage | None
    runs: list[str] = field(default_factory=list)
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def lineage(self) -> list[Stage]:
        """This stage and the stages it is built FROM, nearest first."""
        stages: list[Stage] = []
        stage: Stage | None = self
        while stage is not None:
            stages.append(stage)
            stage = stage.parent
        return stages

    def last(self, keyword: str) -> str | None:
        """The value of the last `keyword` instruction in effect (inherited ones included)."""
        for stage in self.lineage():
            for found, value in reversed(stage.instructions):
                if found == keyword:
                    return value
        return None

    def command(self) -> list[str] | str | None:
        """CMD as an exec-form list, the shell-form string, or None when none is set here."""
        value = self.last("CMD")
        if value is None:
            return None
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        return parsed if isinstance(parsed, list) else value


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, rest) per instruction: continuations joined, comment lines dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # Docker drops these, even mid-continuation
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        pending = ""
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


_FROM = re.compile(r"^(?:--\S+\s+)*(?P<image>\S+)(?:\s+AS\s+(?P<name>\S+))?$", re.IGNORECASE)


def parse_dockerfile(text: str) -> dict[str, Stage]:
    """Named stages of a multi-stage Dockerfile."""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in _instructions(text):
        if keyword == "FROM":
            match = _FROM.match(rest)
            assert match, f"cannot read `FROM {rest}`"
            image = match["image"]
            name = match["name"].lower() if match["name"] else None
            current = Stage(name=name, image=image, parent=stages.get(image.lower()))
            if name is not None:
                stages[name] = current
        elif current is not None:
            current.instructions.append((keyword, rest))
            if keyword == "RUN":
                current.runs.append(rest)
    return stages


# ---- reading docker-compose.yml


def _services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    services: dict[str, dict[str, Any]] = compose["services"]
    return services


SERVICES = _services()
STAGES = parse_dockerfile(DOCKERFILE.read_text())
BUILT_SERVICES = sorted(name for name, service in SERVICES.items() if "build" in service)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Each dependency and its condition (the short list form means service_started)."""
    depends_on = service.get("depends_on") or {}
    if isinstance(depends_on, list):
        return dict.fromkeys(depends_on, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in depends_on.items()}


def _target(service_name: str) -> Stage:
    build = SERVICES[service_name]["build"]
    assert isinstance(build, dict) and "target" in build, (
        f"service {service_name!r} must name its build target: without one Docker builds "
        "the Dockerfile's last stage"
    )
    target = str(build["target"]).lower()
    assert target in STAGES, (
        f"service {service_name!r} builds target {target!r}, but the Dockerfile's stages "
        f"are {sorted(STAGES)}"
    )
    return STAGES[target]


def _argv(service_name: str) -> list[str]:
    """What the container runs: compose `command`, else its target's Dockerfile CMD."""
    service = SERVICES[service_name]
    stage = _target(service_name)
    assert "entrypoint" not in service and stage.last("ENTRYPOINT") is None, (
        f"service {service_name!r}: an entrypoint would turn the command into its arguments"
    )
    command = service["command"] if "command" in service else stage.command()
    assert command is not None, f"service {service_name!r} has no command and no CMD"
    assert isinstance(command, list) and all(isinstance(word, str) for word in command), (
        f"service {service_name!r}: command must be an exec-form list of strings (a shell "
        f"string would make the shell PID 1 and swallow SIGTERM), got {command!r}"
    )
    return command


def _parsed(argv: list[str], where: str) -> argparse.Namespace:
    """argv parsed by the real `trainjob` parser; a rejection fails the test, clearly."""
    assert argv and argv[0] == "trainjob", f"{where}: runs {argv!r}, not a `trainjob` command"
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exit_:
        pytest.fail(
            f"{where}: `{shlex.join(argv)}` is rejected by the trainjob CLI "
            f"(argparse exit {exit_.code}; its message is in the captured stderr)"
        )


def _service_args(service_name: str) -> argparse.Namespace:
    return _parsed(_argv(service_name), f"service {service_name!r}")


def _seconds(duration: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(number + unit for number, unit in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


# ---- the tests


def test_compose_defines_postgres_redis_migrate_api_and_worker() -> None:
    assert set(SERVICES) >= EXPECTED_SERVICES
    assert set(BUILT_SERVICES) >= BUILT_FROM_THIS_REPO


@pytest.mark.parametrize("service_name", BUILT_SERVICES)
def test_every_service_built_here_builds_a_stage_of_the_dockerfile(service_name: str) -> None:
    build = SERVICES[service_name]["build"]
    context = ROOT / (build.get("context", ".") if isinstance(build, dict) else build)
    assert context.resolve() == ROOT, f"service {service_name!r} builds from {context}"
    _target(service_name)


@pytest.mark.parametrize("service_name", BUILT_SERVICES)
def test_every_service_built_here_runs_a_trainjob_command_the_cli_accepts(
    service_name: str,
) -> None:
    _service_args(service_name)


@pytest.mark.parametrize("stage_name", ["api", "worker"])
def test_dockerfile_default_command_of_each_image_is_one_the_cli_accepts(stage_name: str) -> None:
    assert stage_name in STAGES, f"the Dockerfile has no `AS {stage_name}` stage"
    command = STAGES[stage_name].command()
    assert isinstance(command, list), f"stage {stage_name!r}: CMD must be exec form"
    _parsed(command, f"Dockerfile stage {stage_name!r}")


def test_api_runs_without_an_embedded_worker_and_migrate_upgrades_the_database() -> None:
    api = _service_args("api")
    assert (api.command, api.no_worker) == ("serve", True)
    migrate = _service_args("migrate")
    assert (migrate.command, migrate.action) == ("db", "upgrade")
    assert migrate.revision in (None, "head")
    assert _service_args("worker").command == "worker"


def test_api_image_installs_no_torch() -> None:
    lineage = _target("api").lineage()
    assert "torch" not in lineage[-1].image.lower(), f"the API image is FROM {lineage[-1].image}"
    for stage in lineage:
        for run in stage.runs:
            assert "torch" not in run.lower(), f"stage {stage.name!r} installs torch: {run}"
            # `dev` includes `worker`, which brings torch.
            assert not re.search(r"\[[^\]]*\b(worker|dev)\b[^\]]*\]", run), (
                f"stage {stage.name!r} installs an extra that brings torch: {run}"
            )


def test_worker_image_installs_the_worker_extra_on_a_pytorch_image() -> None:
    worker = _target("worker")
    assert "pytorch" in worker.lineage()[-1].image.lower()
    assert any(re.search(r"\[[^\]]*\bworker\b[^\]]*\]", run) for run in worker.runs)
    assert "PYTORCH_NVML_BASED_CUDA_CHECK=1" in " ".join(
        value for keyword, value in worker.instructions if keyword == "ENV"
    )


def test_the_gpu_worker_image_installs_bitsandbytes_for_quantize_and_adamw8bit() -> None:
    # The `cuda` extra: without it the image's GPU worker fails such jobs with invalid_spec.
    assert any(re.search(r"\[[^\]]*\bcuda\b[^\]]*\]", run) for run in _target("worker").runs)


def test_api_healthcheck_probes_the_healthz_route_on_the_served_port() -> None:
    from app.health import router

    healthcheck = _target("api").last("HEALTHCHECK")
    assert healthcheck is not None, "the api stage has no HEALTHCHECK"
    match = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", healthcheck)
    assert match, f"no local URL in HEALTHCHECK {healthcheck}"
    port, path = int(match[1]), match[2]
    assert path in {getattr(route, "path", None) for route in router.routes}
    served = _service_args("api")
    assert served.port == port
    assert any(str(mapping).endswith(f":{port}") for mapping in SERVICES["api"]["ports"])


def test_images_do_not_run_as_root() -> None:
    for name in ("api", "worker"):
        user = _target(name).last("USER")
        assert user not in (None, "root", "0"), f"the {name} image runs as root"


def test_worker_reserves_an_nvidia_gpu() -> None:
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        device.get("driver") == "nvidia"
        and "gpu" in device.get("capabilities", [])
        and (
            device.get("count", 0) == "all"
            or int(device.get("count", 0)) >= 1
            or device.get("device_ids")
        )
        for device in devices
    ), devices


def test_gpu_worker_trains_only_and_a_cpu_worker_consumes_only_the_files_queue() -> None:
    """Validations never wait behind training nor take a GPU worker's turn."""
    environment = _environment(SERVICES["worker"])
    queue = environment.get("TRAINJOB_QUEUE", Settings.model_fields["queue"].default)
    files_queue = _environment(SERVICES["files-worker"]).get(
        "TRAINJOB_FILES_QUEUE", Settings.model_fields["files_queue"].default
    )
    assert _service_args("worker").queues.split(",") == [queue]
    files_worker = _service_args("files-worker")
    assert (files_worker.command, files_worker.queues.split(",")) == ("worker", [files_queue])
    assert "deploy" not in SERVICES["files-worker"], "the files worker needs no GPU"


def test_worker_gets_a_grace_period_to_shut_down_warmly() -> None:
    # Docker's default is 10 s before SIGKILL; the worker hands its job back within
    # its shutdown timeout, which the grace period must outlast.
    grace = SERVICES["worker"].get("stop_grace_period")
    assert grace is not None, "the worker needs a stop_grace_period"
    environment = SERVICES["worker"].get("environment") or {}
    timeout = float(
        environment.get(
            "TRAINJOB_SHUTDOWN_TIMEOUT_SECONDS",
            Settings.model_fields["shutdown_timeout_seconds"].default,
        )
    )
    assert _seconds(str(grace)) > timeout


def test_postgres_and_redis_have_healthchecks() -> None:
    for name, probe in (("postgres", "pg_isready"), ("redis", "redis-cli")):
        test = SERVICES[name].get("healthcheck", {}).get("test")
        assert test is not None, f"{name} has no healthcheck"
        assert probe in (" ".join(test) if isinstance(test, list) else test), test


def test_redis_never_evicts_keys() -> None:
    command = SERVICES["redis"]["command"]
    assert isinstance(command, list), "redis command must be an exec-form list"
    assert "--maxmemory-policy" in command
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def test_migrate_runs_once_after_postgres_is_healthy() -> None:
    migrate = SERVICES["migrate"]
    assert _depends_on(migrate).get("postgres") == "service_healthy"
    # A quoted "no": unquoted, YAML reads it as false.
    assert migrate.get("restart", "no") == "no"


@pytest.mark.parametrize("service_name", ["api", "worker", "files-worker"])
def test_api_and_worker_start_only_after_migrate_completed_successfully(
    service_name: str,
) -> None:
    depends_on = _depends_on(SERVICES[service_name])
    assert depends_on.get("migrate") == "service_completed_successfully", depends_on
    assert depends_on.get("redis") == "service_healthy", depends_on


def test_database_url_uses_the_psycopg_driver() -> None:
    for name in BUILT_FROM_THIS_REPO:
        url = _environment(SERVICES[name]).get("TRAINJOB_DATABASE_URL")
        assert url is not None, f"service {name!r} has no TRAINJOB_DATABASE_URL"
        assert url.startswith("postgresql+psycopg://"), f"service {name!r}: {url}"


def test_migrate_api_and_worker_share_one_database_and_one_redis() -> None:
    for variable in ("TRAINJOB_DATABASE_URL", "TRAINJOB_REDIS_URL"):
        values = {
            _environment(SERVICES[name]).get(variable) for name in ("api", "worker", "files-worker")
        }
        assert len(values) == 1 and None not in values, (variable, values)
    database = _environment(SERVICES["migrate"])["TRAINJOB_DATABASE_URL"]
    assert database == _environment(SERVICES["api"])["TRAINJOB_DATABASE_URL"]


def _image_environment(stage: Stage) -> dict[str, str]:
    """ENV of the stage and its parents (`KEY=value ...` form), nearest last."""
    environment: dict[str, str] = {}
    for built in reversed(stage.lineage()):
        for keyword, value in built.instructions:
            if keyword == "ENV":
                environment |= dict(word.split("=", 1) for word in shlex.split(value))
    return environment


def _refusal_with_no_key(argv: list[str], environment: dict[str, str]) -> str | None:
    """What `trainjob serve` says of this command and environment on a fresh database
    (no API key yet): the first start of a deployment."""
    served = _parsed(argv, "the api")
    assert served.command == "serve", f"the api runs {argv!r}: the guard is in `trainjob serve`"
    settings = Settings.model_validate(
        {key.removeprefix("TRAINJOB_").lower(): value for key, value in environment.items()}
    )
    host = served.host or settings.host
    auth_on = settings.auth == "required"  # `auto` on a fresh database: no key, off
    return exposure.refusal(host, auth=settings.auth, auth_on=auth_on)


def test_compose_api_requires_api_keys_from_the_first_request() -> None:
    environment = _environment(SERVICES["api"])
    assert environment.get("TRAINJOB_AUTH") == "required", environment
    assert _refusal_with_no_key(_argv("api"), environment) is None


def test_the_api_image_alone_refuses_to_serve_an_open_api() -> None:
    # `docker run` of the api image with no key and no TRAINJOB_AUTH: it must fail
    # closed, not listen on 0.0.0.0 with everyone an admin.
    stage = _target("api")
    command = stage.command()
    assert isinstance(command, list)
    environment = {k: v for k, v in _image_environment(stage).items() if k.startswith("TRAINJOB_")}
    refusal = _refusal_with_no_key(command, environment)
    assert refusal is not None and exposure.FIRST_KEY in refusal


def test_compose_documents_the_first_key_with_a_command_the_cli_accepts() -> None:
    command = "docker compose run --rm api trainjob keys create --tenant NAME --admin"
    assert command in COMPOSE_FILE.read_text()
    words = shlex.split(command)
    assert words[4] in SERVICES  # it runs in the api service: its image and environment
    created = _parsed(words[5:], "the compose file's first-key command")
    assert (created.command, created.key_action, created.admin) == ("keys", "create", True)
