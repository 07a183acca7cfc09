"""The committed generated code must be exactly what the pinned generator produces.

protobuf gencode of major V runs only on runtimes V and V+1, and grpc stubs refuse an
older grpcio than the one that generated them, so the committed code, the pins and the
.proto files must move together. These tests fail when any one of them moves alone.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import google.protobuf
import grpc
import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "protos" / "v1"


def _regenerate(out: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )


def test_committed_generated_code_matches_the_protos(tmp_path: Path) -> None:
    _regenerate(tmp_path)
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()}
    committed = {p.name: p.read_text() for p in GENERATED.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed), "generated file set differs: run `make protos`"
    drifted = [name for name in fresh if fresh[name] != committed[name]]
    assert not drifted, f"generated code is stale for {drifted}: run `make protos`"


def test_drift_check_notices_a_changed_proto(tmp_path: Path) -> None:
    """The comparison above must be able to fail: change a .proto, regenerate, compare."""
    protos = tmp_path / "protos"
    (protos / "raresignal" / "v1").mkdir(parents=True)
    for src in (ROOT / "protos" / "raresignal" / "v1").glob("*.proto"):
        (protos / "raresignal" / "v1" / src.name).write_text(src.read_text())
    (protos / "generate.py").write_text((ROOT / "protos" / "generate.py").read_text())
    common = protos / "raresignal" / "v1" / "common.proto"
    common.write_text(common.read_text().replace("double wall_time = 5;", "double wall_time = 6;"))
    subprocess.run([sys.executable, str(protos / "generate.py")], check=True, capture_output=True)
    changed = (protos / "v1" / "common_pb2.py").read_text()
    assert changed != (GENERATED / "common_pb2.py").read_text()


def _major_minor_patch(version: str) -> tuple[int, int, int]:
    major, minor, patch = [*(int(n) for n in re.findall(r"\d+", version)[:3]), 0, 0, 0][:3]
    return major, minor, patch


def test_runtime_versions_accept_the_gencode() -> None:
    """Gencode major V runs on runtime V or V+1; grpc stubs need grpcio >= their version."""
    text = (GENERATED / "common_pb2.py").read_text()
    match = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", text)
    assert match, "gencode version marker not found"
    gen_major = int(match.group(1))
    runtime_major = _major_minor_patch(google.protobuf.__version__)[0]
    assert runtime_major in (gen_major, gen_major + 1)

    stub = (GENERATED / "ingest_pb2_grpc.py").read_text()
    generated_grpc = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", stub)
    assert generated_grpc
    assert _major_minor_patch(grpc.__version__) >= _major_minor_patch(generated_grpc.group(1))


@pytest.mark.parametrize("module", ["common_pb2", "ingest_pb2_grpc", "alerts_pb2_grpc"])
def test_generated_modules_import_under_the_package(module: str) -> None:
    imported = importlib.import_module(f"raresignal.protos.v1.{module}")
    assert imported.__name__.startswith("raresignal.protos.v1")


def test_catalogue_names_follow_prometheus_conventions() -> None:
    from raresignal.protos.catalog import CATALOG, Kind

    for name, spec in CATALOG.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        assert (spec.kind is Kind.COUNTER) == name.endswith("_total"), name
        assert spec.help.endswith("."), f"help of {name} should be a sentence"
