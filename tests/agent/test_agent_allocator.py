"""The agent's reserved-window allocator (``devmodel_agent.hw.Allocator``): first fit,
page granular, zeroed, and freed extents merged so NIC up/down cycles do not leak."""

from __future__ import annotations

import errno

import pytest

from devmodel.memory import ByteMemory

from devmodel_agent.hw import PAGE, AgentError, Allocator

BASE = 0x2000_0000
SIZE = 16 * PAGE


@pytest.fixture
def alloc() -> Allocator:
    return Allocator(ByteMemory(SIZE, base=BASE), BASE, SIZE)


def test_allocations_are_page_rounded_aligned_and_zeroed(alloc):
    a = alloc.alloc(1)
    alloc.mem.write(a, b"\xff" * PAGE)
    b = alloc.alloc(4 * PAGE, 4 * PAGE)
    assert (a, b) == (BASE, BASE + 4 * PAGE)  # the 3 pages before the aligned block stay free
    assert alloc.used == 5 * PAGE
    alloc.free(a)
    again = alloc.alloc(PAGE)
    assert again == a and alloc.mem.read(again, PAGE) == bytes(PAGE)  # reused, and zeroed again
    assert alloc.alloc(3 * PAGE) == BASE + PAGE  # first fit: the gap below the aligned block


def test_freed_neighbours_merge_into_one_extent(alloc):
    blocks = [alloc.alloc(PAGE) for _ in range(4)]
    for addr in (blocks[0], blocks[2], blocks[1]):  # the middle one joins both sides
        alloc.free(addr)
    assert alloc.holes[0] == (BASE, 3 * PAGE)
    assert alloc.alloc(3 * PAGE) == BASE


def test_exhaustion_is_enomem_and_frees_make_room_again(alloc):
    whole = alloc.alloc(SIZE)
    with pytest.raises(AgentError) as exc:
        alloc.alloc(1)
    assert exc.value.code == errno.ENOMEM
    alloc.free(whole)
    assert alloc.used == 0 and alloc.holes == [(BASE, SIZE)]


@pytest.mark.parametrize("bad", [BASE + 8, BASE + PAGE, 0])
def test_freeing_what_was_not_allocated_is_einval_and_changes_nothing(alloc, bad):
    alloc.alloc(PAGE)
    before = (list(alloc.holes), dict(alloc.blocks))
    with pytest.raises(AgentError) as exc:
        alloc.free(bad)
    assert exc.value.code == errno.EINVAL
    assert (alloc.holes, alloc.blocks) == before


def test_double_free_is_einval(alloc):
    a = alloc.alloc(PAGE)
    alloc.free(a)
    with pytest.raises(AgentError):
        alloc.free(a)
