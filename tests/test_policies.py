"""kvtier.eviction policies: exact orders, the leaf-only rule, budgets, pins, admission counts."""

from __future__ import annotations

import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prefix_lru import PrefixLRU  # the original order, kept as the reference of the lru property test

from kvtier.config import AdmissionName, EvictionPolicyName
from kvtier.eviction import (
    ADMISSIONS,
    DEFAULT_POLICY,
    BudgetIndex,
    SecondSight,
    make_admission,
    make_policy,
    policy_names,
)

POLICIES = ["lru", "lfu", "arc", "s3fifo", "adaptive"]


def test_registry_and_config_agree() -> None:
    assert sorted(POLICIES) == policy_names()
    assert set(typing.get_args(EvictionPolicyName)) == set(policy_names())
    assert set(typing.get_args(AdmissionName)) == set(ADMISSIONS)
    assert DEFAULT_POLICY == "adaptive"
    with pytest.raises(ValueError, match="unknown eviction policy 'mru'"):
        make_policy("mru")
    with pytest.raises(ValueError, match="unknown admission"):
        make_admission("never")


# -- lru is exactly the old PrefixLRU ----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("atrp"), st.integers(0, 11), st.integers(0, 40)), max_size=60))
def test_lru_matches_prefix_lru(ops: list[tuple[str, int, int]]) -> None:
    """Same adds, touches, removes: same plans, for every need and budget."""
    old, new = PrefixLRU(), make_policy("lru")
    parent_of = {i: (i - 1 if i % 4 else None) for i in range(12)}  # chains 0-3, 4-7, 8-11
    for op, k, x in ops:
        if op == "a":
            old.add(k, parent_of[k], 1 + k % 3)  # type: ignore[arg-type]
            new.add(k, parent_of[k], 1 + k % 3)
        elif op == "t":
            path = [j for j in range(k - k % 4, k + 1)]
            old.touch(path)  # type: ignore[arg-type]
            new.touch(path)
        elif op == "r":
            assert old.remove(k) == new.remove(k)  # type: ignore[arg-type]
        else:
            budget = old.used_bytes - x % 8
            assert old.plan_eviction(x % 5, budget, protect=[k]) == new.plan_eviction(x % 5, budget, protect=[k])  # type: ignore[list-item]
        assert old.used_bytes == new.used_bytes and len(old) == len(new)
    assert old.plan_eviction(0, 0) == new.plan_eviction(0, 0)
    assert list(old) == list(new)


# -- exact orders on hand-made sequences -------------------------------------------------------------------------


def test_lfu_exact_order_and_aging() -> None:
    p = make_policy("lfu")
    for k in "abc":
        p.add(k, None, 1)
    p.touch(["a"])
    p.touch(["a"])
    p.touch(["b"])
    assert p.plan_eviction(0, 0) == ["c", "b", "a"]  # 1, 2, 3 uses
    p.remove("c", evicted=True)  # aging: L = 1, so a newcomer starts at 1 + 1 = 2, after b (same rank, older)
    p.add("d", None, 1)
    assert p.plan_eviction(0, 0) == ["b", "d", "a"]


def test_lfu_leaves_only() -> None:
    p = make_policy("lfu")
    p.add("r", None, 1)
    p.add("c", "r", 1)
    p.touch(["r"] * 5)  # the root is the most used, its child the least: the child still goes first
    p.add("x", None, 1)
    p.touch(["x"])
    assert p.plan_eviction(0, 0) == ["c", "x", "r"]
    assert p.plan_eviction(1, 3) == ["c"]


def test_arc_exact_victims_and_adaptation() -> None:
    index = BudgetIndex(3, make_policy("arc"))
    arc = index.policy
    for k in "abc":
        assert index.insert(k, None, 1) == []
    index.hit(["a"])  # a -> T2
    assert index.insert("d", None, 1) == ["b"]  # T1 (b, c, d) is over p = 0: its least recent goes; b -> B1
    assert arc.p == 0
    assert index.insert("b", None, 1) == ["c"]  # a B1 ghost: p grows by 1, b enters T2; T1 (c, d) over p
    assert arc.p == 1
    assert index.insert("e", None, 1) == ["d"]
    index.hit(["e"])  # e -> T2; T1 is empty now
    assert index.insert("f", None, 1) == ["a"]  # T1 (f) is not over p = 1: T2's least recent goes
    assert index.insert("a", None, 1) == ["f"]  # a B2 ghost: p shrinks to 0, a enters T2, T1 (f) over p
    assert arc.p == 0


def test_s3fifo_exact_victims() -> None:
    index = BudgetIndex(10, make_policy("s3fifo"))
    for k in "abcdefghij":
        index.insert(k, None, 1)
    index.hit(["c"])  # c moves to main
    assert index.insert("k", None, 1) == ["a"]  # small holds 10 bytes > 10% of 10: its head goes (a ghost now)
    assert index.insert("a", None, 1) == ["b"]  # a ghost comes back into main; small still over its share
    for k in "lmnopqrs":  # small keeps getting evicted FIFO: d .. k
        index.insert(k, None, 1)
    s3 = index.policy
    assert s3._seg_bytes == [8, 2]  # l..s in small; c, a in main
    assert "c" in index and "a" in index


def test_s3fifo_main_second_chance() -> None:
    index = BudgetIndex(4, make_policy("s3fifo"))
    for k in "abcd":
        index.insert(k, None, 1)
    index.hit(["a"])
    index.hit(["b"])
    index.hit(["c"])  # a, b, c in main (no hits left after the promotion); d in small
    index.hit(["a"])  # a has one hit left in main
    assert index.insert("e", None, 1) == ["d"]  # small (d, e) holds 2 > 0.4: its head d
    assert index.insert("f", None, 1) == ["e"]
    index.hit(["f"])  # main: a(1), b, c, f; small empty
    assert index.insert("g", None, 1) == ["b"]  # small (g) holds 1 > 0.4, but g is the newcomer: main; a passed
    assert index.policy._freq["a"] == 0  # its second chance was used: requeued behind f
    assert index.insert("h", None, 1) == ["g"]
    assert index.insert("i", None, 1) == ["h"]
    index.hit(["i"])
    assert index.insert("j", None, 1) == ["c"]


def test_adaptive_exact_order() -> None:
    p = make_policy("adaptive")
    p.add("x", None, 1, tokens=512)
    p.add("y", None, 1, tokens=512)
    p.add("z", None, 1, tokens=10)  # a short tail chunk: before every full chunk of its list
    p.add("w", None, 1, tokens=512)
    assert p.plan_eviction(0, 0) == ["z", "x", "y", "w"]
    p.touch(["x"])  # x -> T2 (hit): T1's chunks go first while T1 is over p = 0
    assert p.plan_eviction(0, 0) == ["z", "y", "w", "x"]
    p.touch(["z"])  # a hit short chunk counts as full
    assert p.plan_eviction(0, 0) == ["y", "w", "x", "z"]


def test_adaptive_ghost_factor() -> None:
    small, big = make_policy("adaptive"), make_policy("adaptive", ghost_factor=3.0)
    for p in (small, big):
        index = BudgetIndex(2, p)
        for k in "abcdefgh":
            index.insert(k, None, 1)
    assert len(small._b1) == 2 and len(big._b1) == 6
    with pytest.raises(ValueError, match="ghost_factor"):
        make_policy("adaptive", ghost_factor=0)


# -- properties of every policy ----------------------------------------------------------------------------------


@st.composite
def workloads(draw: st.DrawFn) -> tuple[list[int | None], list[int], list[tuple[str, int]]]:
    n = draw(st.integers(1, 14))
    parents: list[int | None] = []
    for i in range(n):
        parents.append(draw(st.one_of(st.none(), st.integers(0, i - 1))) if i else None)
    sizes = [draw(st.integers(1, 4)) for _ in range(n)]
    ops = draw(st.lists(st.tuples(st.sampled_from("iihpu"), st.integers(0, n - 1)), max_size=50))
    return parents, sizes, ops


def _path(parents: list[int | None], k: int) -> list[int]:
    path = [k]
    while parents[path[-1]] is not None:
        path.append(parents[path[-1]])  # type: ignore[arg-type]
    return path[::-1]


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=80, deadline=None)
@given(workloads(), st.integers(3, 12))
def test_budget_leaves_and_pins(name: str, work: tuple, budget: int) -> None:
    """Through BudgetIndex: the budget holds after every insert, each victim is a leaf when it goes (no
    resident child), pinned keys never go, and a plan is pure."""
    parents, sizes, ops = work
    index = BudgetIndex(budget, make_policy(name, clock=lambda: 0.0))
    policy = index.policy
    pinned: set[int] = set()
    for op, k in ops:
        if op == "i":
            for j in _path(parents, k):  # parents first, as the engine stores
                before = {x for x in range(len(parents)) if x in index}
                victims = index.insert(j, parents[j], sizes[j], tokens=8 * sizes[j])
                assert policy.used_bytes <= budget
                if victims:
                    assert j not in victims and not set(victims) & pinned
                    gone: set[int] = set()
                    for v in victims:
                        assert v in before
                        kids = {c for c in before if parents[c] == v} - gone
                        assert not kids, f"{name}: {v} went before its child {kids}"
                        gone.add(v)
        elif op == "h":
            index.hit([j for j in _path(parents, k) if j in index])
        elif op == "p":
            policy.pin(k)
            pinned.add(k)
        elif k in pinned:
            policy.unpin(k)
            pinned.discard(k)
        state = (list(policy), policy.used_bytes)
        plan = policy.plan_eviction(2, budget)
        assert (list(policy), policy.used_bytes) == state
        if plan is not None:
            assert not set(plan) & pinned
            assert policy.used_bytes - sum(sizes[v] for v in plan) + 2 <= budget


def _state(policy):  # type: ignore[no-untyped-def]
    """Everything a policy's later decisions depend on (its order, sizes, pins, ARC's target and ghosts)."""
    extra = (getattr(policy, "p", None), list(getattr(policy, "_b1", {}).items()), list(getattr(policy, "_b2", {}).items()))
    return list(policy), policy.used_bytes, policy.evictable(), dict(policy._children), extra


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("seed", range(4))
def test_fused_insert_equals_the_protocol_calls(name: str, seed: int) -> None:
    """BudgetIndex's fused insert_evict gives the same victims and leaves the same state as add, plan_eviction
    and remove called one by one (random trees with hits, pins, deletions, short chunks, several victims per
    insert, long enough to compact the heaps)."""
    import random

    rng = random.Random(seed)
    budget = rng.choice([8, 40, 300])
    fused = make_policy(name, clock=lambda: 0.0)
    calls = make_policy(name, clock=lambda: 0.0)
    parents: dict[int, int | None] = {}
    leaves: list[int] = []
    for step in range(6000):
        op = rng.random()
        if op < 0.7:
            k = len(parents)
            parent = rng.choice(leaves) if leaves and rng.random() < 0.7 else None
            parents[k] = parent
            leaves.append(k)
            nbytes, tokens = rng.choice([(1, 512), (1, 512), (1, 40), (2, 512), (0, 0)])
            if k in fused:
                continue
            a = fused.insert_evict(k, parent, nbytes, budget, tokens=tokens)
            b = calls._insert_evict_calls(k, parent, nbytes, budget, tokens, None)
            assert a == b, f"{name} step {step}"
            assert fused.used_bytes <= budget
        elif op < 0.85 and leaves:
            k = rng.choice(leaves)
            path = [k]
            while parents[path[-1]] is not None:
                path.append(parents[path[-1]])  # type: ignore[arg-type]
            for p in (fused, calls):
                p.touch(path[::-1])
        elif op < 0.9 and parents:
            k = rng.randrange(len(parents))
            pin = rng.random() < 0.5
            for p in (fused, calls):
                p.pin(k) if pin else p.unpin(k)
        elif parents:
            k = rng.randrange(len(parents))
            assert fused.remove(k) == calls.remove(k)
        if step % 500 == 0:
            assert _state(fused) == _state(calls)
    assert _state(fused) == _state(calls)


@pytest.mark.parametrize("name", POLICIES)
def test_pinned_chain_survives_pressure(name: str) -> None:
    index = BudgetIndex(6, make_policy(name))
    for j, k in enumerate(["p0", "p1", "p2"]):
        index.insert(k, f"p{j - 1}" if j else None, 1)
    index.policy.pin("p2")  # the leaf: its ancestors keep a child, so they stay too
    for i in range(40):
        index.insert(f"x{i}", f"x{i - 1}" if i % 5 else None, 1)
        index.hit([f"x{i}"])
        assert all(k in index for k in ("p0", "p1", "p2"))
    index.policy.unpin("p2")
    index.policy.unpin("p2")  # more unpins than pins: harmless
    for i in range(40, 60):
        index.insert(f"x{i}", None, 1)
    assert "p2" not in index


@pytest.mark.parametrize("name", POLICIES)
def test_everything_pinned_refuses(name: str) -> None:
    index = BudgetIndex(2, make_policy(name))
    index.insert("a", None, 1)
    index.insert("b", None, 1)
    index.policy.pin("a")
    index.policy.pin("b")
    assert index.insert("c", None, 1) is None
    assert index.no_room == 1 and "c" not in index
    assert index.insert("big", None, 3) is None  # larger than the budget
    assert index.no_room == 2


# -- admission ---------------------------------------------------------------------------------------------------


def test_second_sight_counts() -> None:
    index = BudgetIndex(100, make_policy("lru"), make_admission("second_sight"))
    assert index.insert("a", None, 1) is None  # first sight
    assert index.insert("b", "a", 1) is None
    index.sighted("c")  # offered, but its parent was refused
    assert index.admission_refused == 2
    assert index.insert("a", None, 1) == []
    assert index.insert("b", "a", 1) == []
    assert index.insert("c", "b", 1) == []  # second sight through sighted()
    assert index.insert("d", "c", 1) is None
    assert index.admission_refused == 3
    assert {k for k in "abcd" if k in index} == {"a", "b", "c"}


def test_sketch_window_forgets() -> None:
    adm = SecondSight(width=1 << 10, window=64)
    assert not adm.admit("k")
    for i in range(200):  # several halvings: the one sighting of k fades
        adm.admit(f"noise{i}")
    assert adm.sketch.estimate("k") == 0
    assert not adm.admit("k")
    assert adm.admit("k")


# -- pins through the engine and the tiers; admission counted by a real tier ---------------------------------------


def _engine_config(tmp_path, **values):  # type: ignore[no-untyped-def]
    from kvtier.config import load_config

    base = {"cache_dir": str(tmp_path / "cache"), "chunk_size": 16, "l1.max_bytes": "20KB", "l2.enabled": "false"}
    base.update(values)
    return load_config(env={}, overrides=base)


def _tok(n: int, seed: int):  # type: ignore[no-untyped-def]
    import numpy as np

    return np.random.default_rng(seed).integers(0, 50_000, size=n).astype(np.int64)


def _kv(namespace, n: int, seed: int = 0):  # type: ignore[no-untyped-def]
    import torch

    return torch.randn(namespace.layout.chunk_shape(n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("policy", ["lru", "adaptive"])
def test_engine_pin_survives_pressure_and_caps(tmp_path, namespace, policy: str) -> None:  # type: ignore[no-untyped-def]
    from kvtier.engine import CacheEngine
    from kvtier.errors import PinLimitError

    chunk_bytes = 16 * namespace.layout.bytes_per_token
    cfg = _engine_config(tmp_path, **{"l1.policy": policy, "pins.max_bytes_per_tenant": str(3 * chunk_bytes)})
    with CacheEngine.from_config(cfg, namespace) as engine:
        system = _tok(40, 1)  # 2 whole chunks + 8 tokens
        pinned = engine.pin(system)
        assert (pinned.chunks, pinned.nbytes, pinned.tiers) == (2, 2 * chunk_bytes, ("l1",))
        assert engine.pin(system).tenant_bytes == 2 * chunk_bytes  # again: a no-op
        with pytest.raises(PinLimitError, match="over its cap"):
            engine.pin(_tok(32, 2))  # 2 more chunks: 4 > 3
        with pytest.raises(ValueError, match="nothing to pin"):
            engine.pin(_tok(10, 3))
        engine.store(system, _kv(namespace, 40))  # stored after the pin: pinned from now on
        for i in range(30):  # far more than l1 holds
            other = _tok(64, 100 + i)
            engine.store(other, _kv(namespace, 64, i))
        assert engine.lookup(system).num_tokens == 32  # both pinned chunks still there (the partial one is not)
        assert engine.unpin(system) == 2 and engine.unpin(system) == 0
        assert engine.pinned_bytes() == 0
        for i in range(30):
            engine.store(_tok(64, 200 + i), _kv(namespace, 64, i))
        assert engine.lookup(system).num_tokens == 0  # unpinned: evicted like anything else


def test_config_pins_applied_at_build(tmp_path, namespace) -> None:  # type: ignore[no-untyped-def]
    from kvtier.engine import CacheEngine
    from kvtier.errors import PinLimitError

    prefix = [int(t) for t in _tok(32, 5)]
    cfg = _engine_config(tmp_path).model_copy(
        update={"pins": _engine_config(tmp_path).pins.model_copy(update={"prefixes": (tuple(prefix),)})}
    )
    with CacheEngine.from_config(cfg, namespace) as engine:
        assert engine.pinned_bytes() == 2 * 16 * namespace.layout.bytes_per_token
    tiny = cfg.model_copy(update={"pins": cfg.pins.model_copy(update={"max_bytes_per_tenant": 1})})
    with pytest.raises(PinLimitError):
        CacheEngine.from_config(tiny, namespace)


def test_memory_tier_counts_admission_refusals(tmp_path, namespace) -> None:  # type: ignore[no-untyped-def]
    from kvtier.engine import CacheEngine

    cfg = _engine_config(tmp_path, **{"l1.admission": "second_sight", "l1.max_bytes": "1MB"})
    with CacheEngine.from_config(cfg, namespace) as engine:
        tokens = _tok(48, 9)  # 3 chunks
        first = engine.store(tokens, _kv(namespace, 48))
        assert first.rejected_chunks == 3  # the first is refused; its children are refused with it (sighted)
        l1 = engine.tiers.tiers[0]
        assert l1.stats().admission_refused == 1 and l1.stats().rejected_puts == 1
        second = engine.store(tokens, _kv(namespace, 48))
        assert second.rejected_chunks == 0  # second sight of every chunk, children included
        assert engine.lookup(tokens).num_tokens == 48


@pytest.mark.parametrize(("policy", "goes"), [("adaptive", 2), ("lru", 1)])
def test_disk_tier_pins_and_preferred_victims(tmp_path, namespace, policy: str, goes: int) -> None:  # type: ignore[no-untyped-def]
    """l2: the local policy's plan is the ledger's first choice (adaptive: the never-hit chain goes although it
    is the newer; lru: the older one), and a pinned chain stays under pressure (the ledger is told the pins)."""
    from kvtier.chunk import encode
    from kvtier.storage import DiskBackend
    from tests.conftest import build_chain

    chains = [build_chain(namespace, _tok(32, 50 + i), 16, seed=i) for i in range(12)]
    size = len(encode(chains[0][0]))
    disk = DiskBackend(tmp_path / "l2", 6 * size, eviction=policy)
    disk.start()
    try:
        disk.pin([c.key for c in chains[0]])
        assert disk.put(chains[0]) == [True, True]
        assert disk.put(chains[1]) == [True, True]
        disk.get([c.key for c in chains[1]])  # chain 1 is hit, then chain 2 stored (never hit)
        assert disk.put(chains[2]) == [True, True]
        assert disk.put(chains[3]) == [True, True]
        assert disk.contains([c.key for c in chains[goes]]) == [False, False]
        assert disk.contains([c.key for c in chains[3 - goes]]) == [True, True]
        for chain in chains[4:]:
            disk.put(chain)
            assert disk.contains([c.key for c in chains[0]]) == [True, True]
        assert disk.stats().used_bytes <= 6 * size
        disk.unpin([c.key for c in chains[0]])
        for chain in chains[4:]:
            disk.put(chain)
        assert disk.contains([c.key for c in chains[0]]) == [False, False]
    finally:
        disk.close()


@pytest.mark.parametrize(("policy", "goes"), [("adaptive", 2), ("lru", 1)])
def test_node_tier_policy_and_pins(tmp_path, namespace, policy: str, goes: int) -> None:  # type: ignore[no-untyped-def]
    """The node tier: this process's node.policy picks the ledger's victims (adaptive: the never-hit chain goes
    although it is the newer; lru: the older one), a pinned chain stays under pressure, and a restarted writer
    takes up the folder's chunks in its view."""
    from kvtier.chunk import encode
    from kvtier.storage import NodeBackend
    from tests.conftest import build_chain

    chains = [build_chain(namespace, _tok(32, 50 + i), 16, seed=i) for i in range(12)]
    size = len(encode(chains[0][0]))
    node = NodeBackend(tmp_path / "node", 6 * size, eviction=policy)
    node.start()
    try:
        node.pin([c.key for c in chains[0]])
        assert node.put(chains[0]) == [True, True]
        assert node.put(chains[1]) == [True, True]
        node.get([c.key for c in chains[1]])  # chain 1 is hit, then chain 2 stored (never hit)
        assert node.put(chains[2]) == [True, True]
        assert node.put(chains[3]) == [True, True]
        assert node.contains([c.key for c in chains[goes]]) == [False, False]
        assert node.contains([c.key for c in chains[3 - goes]]) == [True, True]
        for chain in chains[4:]:
            node.put(chain)
            assert node.contains([c.key for c in chains[0]]) == [True, True]
        assert node.stats().used_bytes <= 6 * size
        node.unpin([c.key for c in chains[0]])
        for chain in chains[4:8]:
            node.put(chain)
        assert node.contains([c.key for c in chains[0]]) == [False, False]
        held = [k for k, _, _ in node.ledger.entries()]
    finally:
        node.close()
    again = NodeBackend(tmp_path / "node", 6 * size, eviction=policy)
    again.start()
    try:
        assert sorted(again._view, key=held.index) == held and again._view.used_bytes == again.stats().used_bytes
    finally:
        again.close()


def test_node_policy_from_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kvtier.config import load_config
    from kvtier.storage import build_backends

    overrides = {"node.enabled": "true", "node.path": str(tmp_path / "n"), "node.max_bytes": "1MB"}
    for value in ("lru", "s3fifo"):
        cfg = load_config(env={}, overrides={**overrides, "l2.enabled": "false", "node.policy": value})
        (node,) = (b for b in build_backends(cfg) if b.name == "node")
        assert node.eviction == value and node._view.name == value
    assert load_config(env={}, overrides=overrides).node.policy == "adaptive"


def test_node_tier_pins_hold_against_chunks_the_view_does_not_know(tmp_path, namespace) -> None:  # type: ignore[no-untyped-def]
    """Chunks another writer stored are not in this process's view, so its plan is empty and the ledger evicts
    in its own order: the pins it is passed still keep the pinned chain (the least recently used one)."""
    from kvtier.chunk import encode
    from kvtier.storage import NodeBackend
    from tests.conftest import build_chain

    chains = [build_chain(namespace, _tok(32, 80 + i), 16, seed=i) for i in range(8)]
    size = len(encode(chains[0][0]))
    mine = NodeBackend(tmp_path / "node", 6 * size)
    other = NodeBackend(tmp_path / "node", 6 * size)
    mine.start()
    other.start()
    try:
        mine.pin([c.key for c in chains[0]])
        assert mine.put(chains[0]) == [True, True]
        for chain in chains[1:3]:
            assert other.put(chain) == [True, True]  # the folder is full now
        for chain in chains[3:8]:
            assert mine.put(chain) == [True, True]
            assert mine.contains([c.key for c in chains[0]]) == [True, True]
        assert mine.stats().used_bytes <= 6 * size
    finally:
        mine.close()
        other.close()
