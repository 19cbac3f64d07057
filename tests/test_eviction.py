"""The ``lru`` policy (kvtier.eviction.make_policy("lru")): exact victim orders, leaves-first, purity, protection."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.eviction import EvictionPolicy, make_policy
from kvtier.keys import ChunkKey


def K(name: str) -> ChunkKey:
    return ChunkKey(hashlib.sha256(name.encode()).digest())


R, A1, A2, B1, B2 = K("R"), K("a1"), K("a2"), K("b1"), K("b2")
NAMES = {R: "R", A1: "a1", A2: "a2", B1: "b1", B2: "b2"}


def names(keys: list[ChunkKey] | None) -> list[str] | None:
    return None if keys is None else [NAMES.get(k, k.hex()[:6]) for k in keys]


def snapshot(lru: EvictionPolicy) -> tuple:
    return (list(lru), lru.used_bytes, len(lru), {k: lru.size_of(k) for k in lru})


@pytest.fixture
def two_chains() -> EvictionPolicy:
    """R -> a1 -> a2 and R -> b1 -> b2, 10 bytes each, added in that order."""
    lru = make_policy("lru")
    for key, parent in ((R, None), (A1, R), (A2, A1), (B1, R), (B2, B1)):
        lru.add(key, parent, 10)
    return lru


def test_add_order_and_accounting(two_chains: EvictionPolicy) -> None:
    assert names(list(two_chains)) == ["R", "a1", "a2", "b1", "b2"]
    assert two_chains.used_bytes == 50
    assert len(two_chains) == 5
    assert A1 in two_chains and K("zz") not in two_chains
    assert two_chains.size_of(B2) == 10


def test_touch_makes_ancestors_most_recent(two_chains: EvictionPolicy) -> None:
    two_chains.touch([R, A1])
    assert names(list(two_chains)) == ["a2", "b1", "b2", "a1", "R"]
    two_chains.touch([R, B1, B2, K("absent")])
    assert names(list(two_chains)) == ["a2", "a1", "b2", "b1", "R"]


def test_add_existing_only_touches(two_chains: EvictionPolicy) -> None:
    two_chains.add(A1, None, 999)
    assert names(list(two_chains)) == ["R", "a2", "b1", "b2", "a1"]
    assert two_chains.used_bytes == 50
    assert two_chains.size_of(A1) == 10
    # a1 kept its parent: R still cannot go before both chains are gone
    assert names(two_chains.plan_eviction(0, 10)) == ["a2", "b2", "b1", "a1"]


def test_exact_victim_order_after_touch(two_chains: EvictionPolicy) -> None:
    two_chains.touch([R, A1])  # order: a2, b1, b2, a1, R
    expected = ["a2", "b2", "b1", "a1", "R"]
    for n in range(1, 6):
        assert names(two_chains.plan_eviction(10 * n, 50)) == expected[:n]
    assert names(two_chains.plan_eviction(0, 20)) == expected[:3]
    assert two_chains.plan_eviction(0, 50) == []
    assert two_chains.plan_eviction(5, 55) == []
    assert names(two_chains.plan_eviction(6, 55)) == ["a2"]


def test_exact_victim_order_without_touch(two_chains: EvictionPolicy) -> None:
    # the LRU end holds parents; the scan skips them and takes the oldest leaf
    assert names(two_chains.plan_eviction(0, 0)) == ["a2", "a1", "b2", "b1", "R"]


def test_plan_is_pure(two_chains: EvictionPolicy) -> None:
    two_chains.touch([R, B1])
    before = snapshot(two_chains)
    for need, budget in ((10, 50), (50, 50), (100, 50), (0, 0)):
        two_chains.plan_eviction(need, budget, protect=[B2])
        two_chains.plan_eviction(need, budget)
        assert snapshot(two_chains) == before


def test_remove_makes_parent_a_leaf(two_chains: EvictionPolicy) -> None:
    assert two_chains.remove(A2) == 10
    assert two_chains.remove(A2) == 0
    assert two_chains.used_bytes == 40
    assert names(two_chains.plan_eviction(10, 40)) == ["a1"]
    assert two_chains.remove(A1) == 10
    assert two_chains.remove(B2) == 10
    assert two_chains.remove(B1) == 10
    assert names(two_chains.plan_eviction(10, 10)) == ["R"]


def test_protect(two_chains: EvictionPolicy) -> None:
    two_chains.touch([R, A1])  # order: a2, b1, b2, a1, R
    assert names(two_chains.plan_eviction(10, 50, protect=[A2])) == ["b2"]
    assert names(two_chains.plan_eviction(20, 50, protect=[A2])) == ["b2", "b1"]
    # with a2 protected, a1 and R keep a child forever
    assert two_chains.plan_eviction(30, 50, protect=[A2]) is None
    assert two_chains.plan_eviction(10, 50, protect=[A2, B2]) is None
    assert two_chains.plan_eviction(50, 50, protect=[R]) is None
    assert names(two_chains.plan_eviction(40, 50, protect=[R])) == ["a2", "b2", "b1", "a1"]


def test_protecting_a_parent_still_allows_its_leaves(two_chains: EvictionPolicy) -> None:
    assert names(two_chains.plan_eviction(20, 50, protect=[B1])) == ["a2", "a1"]
    assert names(two_chains.plan_eviction(30, 50, protect=[B1])) == ["a2", "a1", "b2"]
    assert two_chains.plan_eviction(40, 50, protect=[B1]) is None


def test_impossible_returns_none(two_chains: EvictionPolicy) -> None:
    assert two_chains.plan_eviction(51, 50) is None
    assert two_chains.plan_eviction(1, 0) is None
    assert make_policy("lru").plan_eviction(1, 0) is None
    assert make_policy("lru").plan_eviction(5, 5) == []


def test_variable_sizes_stop_as_soon_as_enough() -> None:
    lru = make_policy("lru")
    big, small1, small2 = K("big"), K("s1"), K("s2")
    lru.add(small1, None, 1)
    lru.add(big, None, 100)
    lru.add(small2, None, 1)
    assert lru.plan_eviction(1, 102) == [small1]
    assert lru.plan_eviction(2, 102) == [small1, big]
    assert lru.plan_eviction(0, 1) == [small1, big]


def test_child_of_absent_parent_is_a_leaf() -> None:
    lru = make_policy("lru")
    orphan_parent = K("gone")
    lru.add(A1, orphan_parent, 10)
    assert lru.plan_eviction(10, 10) == [A1]
    lru.remove(A1)
    assert lru.used_bytes == 0 and len(lru) == 0
    # the counter for the absent parent must not linger: adding it later makes it a plain leaf
    lru.add(orphan_parent, None, 10)
    assert lru.plan_eviction(10, 10) == [orphan_parent]


# -- properties -----------------------------------------------------------------------------------------------


@st.composite
def forests(draw: st.DrawFn) -> tuple[list[tuple[int, int | None, int]], list[list[int]]]:
    n = draw(st.integers(1, 12))
    nodes = []
    for i in range(n):
        parent = draw(st.one_of(st.none(), st.integers(0, i - 1))) if i else None
        nodes.append((i, parent, draw(st.integers(1, 5))))
    touches = draw(st.lists(st.integers(0, n - 1), max_size=6))
    paths = []
    for leaf in touches:
        path = [leaf]
        while nodes[path[-1]][1] is not None:
            path.append(nodes[path[-1]][1])
        paths.append(path[::-1])
    return nodes, paths


@settings(max_examples=150, deadline=None)
@given(forests(), st.integers(0, 60), st.data())
def test_victims_are_always_leaves_at_their_turn(forest, need: int, data: st.DataObject) -> None:
    nodes, paths = forest
    keys = [K(f"n{i}") for i in range(len(nodes))]
    lru = make_policy("lru")
    for i, parent, size in nodes:
        lru.add(keys[i], None if parent is None else keys[parent], size)
    for path in paths:
        lru.touch([keys[i] for i in path])
    protect = data.draw(st.sets(st.integers(0, len(nodes) - 1), max_size=3))
    budget = lru.used_bytes
    before = snapshot(lru)
    victims = lru.plan_eviction(need, budget, protect=[keys[i] for i in protect])
    assert snapshot(lru) == before
    children = {k: [keys[i] for i, p, _ in nodes if p is not None and keys[p] == k] for k in keys}
    size = {keys[i]: s for i, _, s in nodes}
    if victims is None:
        # nothing evictable would have been enough: evicting every evictable subtree still falls short
        evictable = {k for k in keys if keys.index(k) not in protect}
        changed = True
        while changed:
            changed = False
            for k in list(evictable):
                if any(c not in evictable for c in children[k]):
                    evictable.discard(k)
                    changed = True
        assert sum(size[k] for k in evictable) < need
        return
    assert len(set(victims)) == len(victims)
    assert not {keys.index(v) for v in victims} & protect
    for pos, v in enumerate(victims):
        assert all(c in victims[:pos] for c in children[v]), "a parent went before its child"
    freed = sum(size[v] for v in victims)
    assert freed >= need
    if victims:
        assert freed - size[victims[-1]] < need, "evicted more than needed"
