"""Regenerates the Python code of the wire contract from ``raresignal/v1/*.proto``.

The generated modules live in ``protos/v1`` and are imported as
``raresignal.protos.v1``. protoc writes absolute imports that follow the .proto path
(``from raresignal.v1 import common_pb2``); those are rewritten to relative ones so
the code works under the ``raresignal.protos`` package. Run it with the pinned
grpcio-tools (``make protos``); a test fails when the committed code drifts.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
SOURCE_DIR = PROTO_ROOT / "raresignal" / "v1"
OUTPUT_DIR = PROTO_ROOT / "v1"
_ABSOLUTE_IMPORT = re.compile(r"^from raresignal\.v1 import ", re.MULTILINE)


def generate(output_dir: Path) -> list[Path]:
    """Runs protoc on every .proto and writes the rewritten modules to ``output_dir``."""
    import grpc_tools
    from grpc_tools import protoc  # the pinned generator, a dev dependency only

    proto_files = sorted(SOURCE_DIR.glob("*.proto"))
    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p.relative_to(PROTO_ROOT)) for p in proto_files),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; see the message above")
        written = []
        output_dir.mkdir(parents=True, exist_ok=True)
        for produced in sorted((Path(tmp) / "raresignal" / "v1").iterdir()):
            text = _ABSOLUTE_IMPORT.sub("from . import ", produced.read_text())
            target = output_dir / produced.name
            target.write_text(text)
            written.append(target)
        init = output_dir / "__init__.py"
        init.write_text('"""Generated code of the raresignal.v1 wire contract (do not edit)."""\n')
        written.append(init)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUTPUT_DIR, help="output folder")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
