"""BlockManager: allocation arithmetic, all-or-nothing, ref counts, slots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.block_manager import BlockManager
from engine.request import Request, SamplingParams


def make_request(request_id: str = "r", num_prompt_tokens: int = 4) -> Request:
    return Request(request_id, list(range(num_prompt_tokens)), SamplingParams())


@pytest.mark.parametrize(
    ("num_tokens", "blocks"),
    [(1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2), (7, 2), (8, 2), (9, 3)],
)
def test_blocks_at_boundaries(num_tokens: int, blocks: int) -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    request = make_request()
    assert manager.blocks_needed(num_tokens) == blocks
    assert manager.num_new_blocks_needed(request, num_tokens) == blocks
    assert manager.allocate_slots(request, num_tokens)
    assert len(request.block_ids) == blocks
    assert manager.num_used_blocks == blocks
    assert manager.num_free_blocks == 8 - blocks


def test_blocks_needed_zero() -> None:
    assert BlockManager(4, 4).blocks_needed(0) == 0


@pytest.mark.parametrize("computed", range(1, 10))
def test_growth_counts_only_missing_blocks(computed: int) -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    request = make_request()
    assert manager.allocate_slots(request, computed)
    request.num_computed_tokens = computed
    for extra in range(1, 6):
        expected = manager.blocks_needed(computed + extra) - len(request.block_ids)
        assert manager.num_new_blocks_needed(request, extra) == expected
    assert manager.num_new_blocks_needed(request, 0) == 0
    before = list(request.block_ids)
    assert manager.allocate_slots(request, 1)
    assert request.block_ids[: len(before)] == before
    assert len(request.block_ids) == manager.blocks_needed(computed + 1)


def test_allocation_is_all_or_nothing() -> None:
    manager = BlockManager(num_blocks=3, block_size=4)
    a, b = make_request("a"), make_request("b")
    assert manager.allocate_slots(a, 8)
    assert not manager.can_allocate(b, 5)
    assert not manager.allocate_slots(b, 5)
    assert b.block_ids == []
    assert manager.num_free_blocks == 1
    assert manager.can_allocate(b, 4)
    assert manager.allocate_slots(b, 4)
    assert manager.num_free_blocks == 0


def test_free_returns_everything() -> None:
    manager = BlockManager(num_blocks=10, block_size=2)
    requests = [make_request(str(i)) for i in range(3)]
    for i, request in enumerate(requests):
        assert manager.allocate_slots(request, 2 * i + 3)
    all_ids = [b for r in requests for b in r.block_ids]
    assert len(all_ids) == len(set(all_ids)) == manager.num_used_blocks
    for request in requests:
        manager.free(request)
        assert request.block_ids == []
    assert manager.num_free_blocks == 10
    assert manager.num_used_blocks == 0
    assert all(manager.ref_count(b) == 0 for b in range(10))


def test_free_reuses_tail_blocks_first() -> None:
    manager = BlockManager(num_blocks=3, block_size=1)
    a, b = make_request("a"), make_request("b")
    assert manager.allocate_slots(a, 3)
    tail = a.block_ids[-1]
    manager.free(a)
    assert manager.allocate_slots(b, 1)
    assert b.block_ids == [tail]


def test_shared_block_survives_one_free() -> None:
    manager = BlockManager(num_blocks=4, block_size=4)
    a, b = make_request("a"), make_request("b")
    assert manager.allocate_slots(a, 8)
    b.block_ids = manager.share(a.block_ids[:1])
    assert b.block_ids == a.block_ids[:1]
    shared = b.block_ids[0]
    assert manager.ref_count(shared) == 2
    manager.free(a)
    assert manager.ref_count(shared) == 1
    assert manager.num_used_blocks == 1
    c = make_request("c")
    assert manager.allocate_slots(c, 12)
    assert shared not in c.block_ids
    manager.free(b)
    manager.free(c)
    assert manager.num_free_blocks == 4


def test_share_of_free_block_is_refused() -> None:
    manager = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="not allocated"):
        manager.share([0])
    with pytest.raises(ValueError, match="not allocated"):
        manager.share([5])


def test_slot_follows_block_table() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    request = make_request()
    request.block_ids = [7, 2, 5]
    expected = [*range(28, 32), *range(8, 12), *range(20, 24)]
    assert [manager.slot(request, t) for t in range(12)] == expected
    with pytest.raises(IndexError):
        manager.slot(request, 12)
    with pytest.raises(IndexError):
        manager.slot(request, -1)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)


def test_no_torch_imported() -> None:
    code = (
        "import sys, engine.block_manager, engine.scheduler, engine.request\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    repo_root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root)
