"""KVLayout: sizes, (de)serialisation, and mismatches named by field."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvtransfer import KVLayout, LayoutMismatch

LAYOUT = KVLayout(num_layers=3, num_kv_heads=4, head_dim=16, dtype="bfloat16", tp_rank=1, tp_size=2)

layouts = st.builds(
    lambda layers, heads, dim, dtype, size, rank: KVLayout(layers, heads, dim, dtype, rank % size, size),
    st.integers(1, 128),
    st.integers(1, 64),
    st.integers(1, 512),
    st.sampled_from(["float32", "float16", "bfloat16"]),
    st.integers(1, 8),
    st.integers(0, 7),
)


@pytest.mark.parametrize(("dtype", "size"), [("float32", 4), ("float16", 2), ("bfloat16", 2)])
def test_bytes_per_token_and_shape(dtype: str, size: int) -> None:
    layout = KVLayout(num_layers=3, num_kv_heads=4, head_dim=16, dtype=dtype)
    assert layout.bytes_per_token() == 3 * 2 * 4 * 16 * size
    assert layout.shape(7) == (3, 2, 7, 4, 16)
    kv = torch.zeros(layout.shape(7), dtype=layout.torch_dtype)
    assert kv.numel() * kv.element_size() == 7 * layout.bytes_per_token()
    assert KVLayout.for_tensor(kv) == layout


@given(layouts)
def test_dict_round_trip(layout: KVLayout) -> None:
    assert KVLayout.from_dict(layout.to_dict()) == layout


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**LAYOUT.to_dict(), "block_size": 16}, "unknown KVLayout fields"),
        ({"num_layers": 1, "num_kv_heads": 1, "dtype": "float16"}, "head_dim"),
        ({**LAYOUT.to_dict(), "dtype": "int8"}, "dtype must be one of"),
        ({**LAYOUT.to_dict(), "head_dim": 0}, "head_dim must be a positive int"),
        ({**LAYOUT.to_dict(), "tp_rank": 2}, r"tp_rank must be in \[0, 2\)"),
        ([1, 2], "JSON object"),
    ],
)
def test_from_dict_refuses_bad_input(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KVLayout.from_dict(data)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("shape", "dtype", "field"),
    [
        ((2, 2, 5, 4, 16), torch.bfloat16, "num_layers differs: layout has 3, kv has 2"),
        ((3, 2, 5, 8, 16), torch.bfloat16, "num_kv_heads differs"),
        ((3, 2, 5, 4, 32), torch.bfloat16, "head_dim differs"),
        ((3, 3, 5, 4, 16), torch.bfloat16, "dim 1 must be 2"),
        ((3, 2, 5, 4, 16), torch.float16, "dtype differs: layout has bfloat16"),
        ((3, 2, 5, 64), torch.bfloat16, "5 dims"),
    ],
)
def test_check_names_the_field(shape: tuple[int, ...], dtype: torch.dtype, field: str) -> None:
    with pytest.raises(LayoutMismatch, match=field):
        LAYOUT.check(torch.zeros(shape, dtype=dtype))


def test_check_accepts_any_token_count() -> None:
    for n in (0, 1, 13):
        LAYOUT.check(torch.zeros(LAYOUT.shape(n), dtype=torch.bfloat16))


def test_compatible_ignores_tp_rank_only() -> None:
    assert LAYOUT.compatible(KVLayout(3, 4, 16, "bfloat16", tp_rank=0, tp_size=2))
    for name, other in [
        ("num_layers", KVLayout(4, 4, 16, "bfloat16", 1, 2)),
        ("num_kv_heads", KVLayout(3, 2, 16, "bfloat16", 1, 2)),
        ("head_dim", KVLayout(3, 4, 8, "bfloat16", 1, 2)),
        ("dtype", KVLayout(3, 4, 16, "float32", 1, 2)),
    ]:
        assert not LAYOUT.compatible(other)
        with pytest.raises(LayoutMismatch, match=f"^{name} differs"):
            LAYOUT.check_compatible(other)


def test_different_tp_sizes_need_resharding() -> None:
    other = KVLayout(3, 8, 16, "bfloat16", tp_rank=0, tp_size=1)
    assert not LAYOUT.compatible(other)
    with pytest.raises(LayoutMismatch, match=r"tp_size differs: 2 here, 1 .*resharding .* not supported yet"):
        LAYOUT.check_compatible(other)
