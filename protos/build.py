"""Regenerates the committed Python stubs from the .proto files: `python -m protos.build [OUT_DIR]`."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES = ["protos/splitserve/v1/generation.proto", "protos/splitserve/internal/v1/worker.proto"]


def generate(out_dir: Path = ROOT) -> list[Path]:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py under ``out_dir`` (paths mirror the .proto files)."""
    from grpc_tools import protoc

    out = str(out_dir)
    args = ["protoc", f"-I{ROOT}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *PROTO_FILES]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted(p for f in PROTO_FILES for p in (out_dir / f).parent.glob(Path(f).stem + "_pb2*"))


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT):
        print(path)
