"""The wheel, installed on its own, holds every package and data file and imports.

The folders are mapped into the ``raresignal`` namespace by an explicit package list in
pyproject.toml; a sub-package added to the tree but not to that list would work in an
editable install and break for every user of the wheel. This test builds the real wheel
and imports from a fresh virtual environment that has nothing of the source tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"agent": "raresignal/agent", "client": "raresignal/client",
           "server": "raresignal/server", "integrations": "raresignal/integrations",
           "demo": "raresignal/demo", "protos": "raresignal/protos"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)],
        cwd=ROOT, check=True, capture_output=True,
    )
    (built,) = out.glob("raresignal-*.whl")
    return built


def _source_packages() -> set[str]:
    packages = set()
    for folder, target in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            packages.add(str(Path(target) / relative) if str(relative) != "." else target)
    return packages


def test_wheel_holds_every_package_and_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [p for p in sorted(_source_packages()) if f"{p}/__init__.py" not in names]
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {missing}"
    assert "raresignal/protos/raresignal/v1/ingest.proto" in names
    assert "raresignal/server/alerting/default_rules.yaml" in names
    assert "raresignal/server/storage/migrations/postgres/0001_initial.sql" in names
    assert not any(n.startswith("tests/") for n in names)


def test_installed_wheel_imports_in_a_fresh_environment(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True).strip())
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
         "--target", str(site), str(wheel)],
        check=True, capture_output=True,
    )
    # Third-party dependencies come from this environment; raresignal itself must not.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "zz_dependencies.pth").write_text("\n".join(deps) + "\n")
    check = (
        "import raresignal.agent.api, raresignal.client.cli, raresignal.server.cli, "
        "raresignal.integrations, raresignal.demo, "
        "raresignal.protos.v1.ingest_pb2_grpc as g, raresignal.protos.catalog as c\n"
        "from raresignal.server.alerting.rules import default_rules_text\n"
        "assert 'RunStalled' in default_rules_text()\n"
        "from raresignal.server.storage.migrate import shipped_migrations\n"
        "assert shipped_migrations()\n"
        "import pathlib, sys\n"
        f"site = pathlib.Path({str(site)!r})\n"
        "for m in (raresignal.agent.api, g, c):\n"
        "    assert site in pathlib.Path(m.__file__).parents, m.__file__\n"
        "print('imported from', site)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    result = subprocess.run([str(python), "-c", check], capture_output=True, text=True,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "imported from" in result.stdout
