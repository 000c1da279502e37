"""The committed stubs are what protoc makes of the committed .proto files."""

from __future__ import annotations

from pathlib import Path

from protos.build import ROOT, generate


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "protoc produced nothing"
    stale = [str(p.relative_to(tmp_path)) for p in fresh
             if (ROOT / p.relative_to(tmp_path)).read_bytes() != p.read_bytes()]
    assert not stale, f"stale stubs (run `python -m protos.build`): {stale}"


def test_public_service_name_is_the_contract() -> None:
    from protos.splitserve.v1 import generation_pb2

    service = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "splitserve.v1.Generation"
    assert {m.name for m in service.methods} == {"Generate", "GenerateStream"}
    assert not service.methods_by_name["Generate"].server_streaming
    assert service.methods_by_name["GenerateStream"].server_streaming
