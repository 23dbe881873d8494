"""Generate the gRPC Python code from proto/ into the git-ignored package parley/v1/.

`python -m server.proto_build [OUT_DIR]` (run by `make proto`).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
PROTO_FILES = ["parley/v1/translate.proto"]


def generate(out_dir: Path = ROOT) -> list[Path]:
    from grpc_tools import protoc  # build-time only: the serving image ships generated code

    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *PROTO_FILES]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILES}")
    for package in ("parley", "parley/v1"):
        (out_dir / package / "__init__.py").touch()
    return sorted((out_dir / "parley").rglob("*.py*"))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
