"""The KV block pool and caches that share it: ids, ref counts, slots, and one write per pool."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import BaseKVCache, DenseKVCache, PagedKVCache, append_batch
from cb_lab.exceptions import ConfigurationError, KVCacheError, ValidationError
from cb_lab.exceptions import MemoryError as CBLabMemoryError

D = 4


def rows(n: int, seed: int, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def pool_state(pool: BlockPool) -> tuple[Any, ...]:
    return (
        pool.stats(), list(pool.ref_counts), list(pool.free_block_ids),
        pool.key_cache.clone(), pool.value_cache.clone(),
    )


def assert_same_pool_state(before: tuple[Any, ...], pool: BlockPool) -> None:
    after = pool_state(pool)
    assert before[:3] == after[:3]
    torch.testing.assert_close(before[3], after[3], rtol=0, atol=0)
    torch.testing.assert_close(before[4], after[4], rtol=0, atol=0)


# ---------------------------------------------------------------- allocate / free / ref counts


def test_allocate_hands_out_lowest_ids_first_with_ref_count_one() -> None:
    pool = BlockPool(6, 2, D)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate() == [2]
    assert pool.allocate(2) == [3, 4]
    assert pool.ref_counts == [1, 1, 1, 1, 1, 0]
    assert pool.free_block_ids == [5]
    assert (pool.num_used_blocks, pool.num_free_blocks) == (5, 1)


def test_free_drops_the_count_and_returns_the_block_at_zero() -> None:
    pool = BlockPool(4, 2, D)
    ids = pool.allocate(3)
    pool.free([ids[1]])
    assert pool.ref_counts == [1, 0, 1, 0]
    assert sorted(pool.free_block_ids) == [1, 3]
    assert pool.num_used_blocks == 2
    assert pool.allocate(1) == [1]  # the block just freed is handed out again
    pool.free([0, 1, 2])
    assert pool.ref_counts == [0, 0, 0, 0] and sorted(pool.free_block_ids) == [0, 1, 2, 3]


def test_double_free_is_a_validation_error_naming_the_block() -> None:
    pool = BlockPool(4, 2, D)
    pool.allocate(3)
    pool.free([2])
    before = pool_state(pool)
    with pytest.raises(ValidationError, match=r"block 2 is not allocated"):
        pool.free([2])
    assert_same_pool_state(before, pool)


@pytest.mark.parametrize("block_id", [3, -1, 4, 100])  # never allocated, negative, just out of range, far out
def test_free_of_a_block_not_handed_out_is_a_validation_error(block_id: int) -> None:
    pool = BlockPool(4, 2, D)
    pool.allocate(2)
    before = pool_state(pool)
    with pytest.raises(ValidationError, match=rf"block {block_id} is not allocated"):
        pool.free([block_id])
    assert_same_pool_state(before, pool)


def test_a_failed_free_frees_nothing() -> None:
    pool = BlockPool(4, 2, D)
    pool.allocate(2)
    with pytest.raises(ValidationError, match="block 3"):
        pool.free([0, 3])
    assert pool.ref_counts == [1, 1, 0, 0] and sorted(pool.free_block_ids) == [2, 3]


def test_can_allocate() -> None:
    pool = BlockPool(3, 2, D)
    assert pool.can_allocate(0) and pool.can_allocate(3) and not pool.can_allocate(4)
    pool.allocate(2)
    assert pool.can_allocate(1) and not pool.can_allocate(2)
    assert BlockPool(1, 2, D, growable=True).can_allocate(1000)


def test_exhaustion_is_cb_lab_memory_error_naming_the_numbers_and_changes_nothing() -> None:
    pool = BlockPool(5, 2, D)
    pool.allocate(3)
    before = pool_state(pool)
    with pytest.raises(CBLabMemoryError, match=r"4 block\(s\) needed, 2 free of 5") as info:
        pool.allocate(4)
    assert not isinstance(info.value, MemoryError)  # cb-lab's, not the builtin
    assert_same_pool_state(before, pool)
    assert pool.allocate(2) == [3, 4]  # what was there is still there


def test_growable_pool_doubles_and_keeps_contents_and_ids() -> None:
    pool = BlockPool(2, 3, D, growable=True)
    first = pool.allocate(2)
    k, v = rows(6, seed=1)
    pool.write(torch.arange(6), k, v)
    key_before, value_before = pool.key_cache.clone(), pool.value_cache.clone()
    assert pool.allocate(1) == [2]  # short by one: the pool doubles
    assert pool.num_blocks == 4 and pool.ref_counts == [1, 1, 1, 0] and pool.free_block_ids == [3]
    torch.testing.assert_close(pool.key_cache[:, :2], key_before, rtol=0, atol=0)
    torch.testing.assert_close(pool.value_cache[:, :2], value_before, rtol=0, atol=0)
    assert bool((pool.key_cache[:, 2:] == 0).all())
    assert pool.key_cache.dtype == torch.float32 and pool.key_cache.shape == (1, 4, 3, D)  # one layer
    assert first == [0, 1]
    assert pool.allocate(2) == [3, 4] and pool.num_blocks == 8  # doubled again
    assert pool.allocate(20) == list(range(5, 25))  # a big request grows by at least what it needs
    assert pool.num_blocks >= 25 and pool.num_free_blocks == pool.num_blocks - 25


def test_write_to_flat_slots_lands_at_block_and_offset() -> None:
    bs = 3
    pool = BlockPool(4, bs, D)
    slots = [11, 0, 5, 3, 7]
    k, v = rows(len(slots), seed=2)
    pool.write(torch.tensor(slots), k, v)
    for i, slot in enumerate(slots):
        torch.testing.assert_close(pool.key_cache[0, slot // bs, slot % bs], k[i], rtol=0, atol=0)
        torch.testing.assert_close(pool.value_cache[0, slot // bs, slot % bs], v[i], rtol=0, atol=0)
    written = torch.zeros(4 * bs, dtype=torch.bool)
    written[slots] = True
    assert bool((pool.key_cache.view(-1, D)[~written] == 0).all())  # nothing else was touched
    assert bool((pool.value_cache.view(-1, D)[~written] == 0).all())


def test_a_pool_of_layers_stores_each_part_of_a_row_in_its_layer() -> None:
    bs, L = 3, 3
    pool = BlockPool(4, bs, L * D, num_layers=L)
    assert pool.key_cache.shape == (L, 4, bs, D) and pool.key_cache[1].is_contiguous()
    slots = [11, 0, 5, 3, 7]
    k, v = rows(len(slots), seed=3, d=L * D)  # a row: layer 0's D values, then layer 1's, then layer 2's
    pool.write(torch.tensor(slots), k, v)
    for i, slot in enumerate(slots):
        for layer in range(L):
            part = slice(layer * D, (layer + 1) * D)
            torch.testing.assert_close(pool.key_cache[layer, slot // bs, slot % bs], k[i, part], rtol=0, atol=0)
            torch.testing.assert_close(pool.value_cache[layer, slot // bs, slot % bs], v[i, part], rtol=0, atol=0)
    read_k, read_v = pool.read(torch.tensor([3, 0]))  # blocks 3 and 0: slots 9..11, then 0..2
    torch.testing.assert_close(read_k[[2, 3]], k[[0, 1]], rtol=0, atol=0)
    torch.testing.assert_close(read_v[[2, 3]], v[[0, 1]], rtol=0, atol=0)
    assert read_k.shape == (2 * bs, L * D) and bool((read_k[[0, 1, 4, 5]] == 0).all())


def test_a_cache_on_a_pool_of_layers_reads_back_its_rows_and_copies_on_write() -> None:
    L = 2
    pool = BlockPool(8, 2, L * D, num_layers=L)
    parent = PagedKVCache(2, pool=pool)
    k, v = rows(3, seed=4, d=L * D)
    parent.append(k, v)
    child = parent.fork()
    k2, v2 = rows(2, seed=5, d=L * D)
    child.append(k2, v2)  # into a copy of the shared last block
    torch.testing.assert_close(parent.get_kv()[0], k, rtol=0, atol=0)
    torch.testing.assert_close(child.get_kv()[0], torch.cat([k, k2]), rtol=0, atol=0)
    torch.testing.assert_close(child.get_kv()[1], torch.cat([v, v2]), rtol=0, atol=0)
    assert pool.num_copies == 1 and repr(pool).endswith("dim=8, num_layers=2, tokens=8)")


def test_stats_add_up() -> None:
    pool = BlockPool(8, 4, D)
    assert pool.stats() == {"num_blocks": 8, "used_blocks": 0, "free_blocks": 8, "tokens_stored": 0, "unused_slots": 0}
    a, b = PagedKVCache(4, pool=pool), PagedKVCache(4, pool=pool)
    a.append(*rows(5, 1))  # 2 blocks, 3 slots empty
    b.append(*rows(1, 2))  # 1 block, 3 slots empty
    s = pool.stats()
    assert s == {"num_blocks": 8, "used_blocks": 3, "free_blocks": 5, "tokens_stored": 6, "unused_slots": 6}
    assert s["used_blocks"] + s["free_blocks"] == s["num_blocks"]
    assert s["unused_slots"] == s["used_blocks"] * pool.block_size - s["tokens_stored"]
    assert repr(pool) == "BlockPool(blocks=3/8 used, block_size=4, dim=4, tokens=6)"


@pytest.mark.parametrize(
    ("args", "kwargs", "needle"),
    [
        ((0, 2, D), {}, "num_blocks"),
        ((-1, 2, D), {}, "num_blocks"),
        ((2.0, 2, D), {}, "num_blocks"),
        ((True, 2, D), {}, "num_blocks"),
        ((2, 0, D), {}, "block_size"),
        ((2, "4", D), {}, "block_size"),
        ((2, 2, 0), {}, "dim"),
        ((2, 2, None), {}, "dim"),
        ((2, 2, D), {"num_layers": 0}, "num_layers"),
        ((2, 2, D), {"num_layers": 3}, "num_layers"),
    ],
)
def test_bad_constructor_args_are_configuration_errors(
    args: tuple[Any, ...], kwargs: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ConfigurationError, match=needle):
        BlockPool(*args, **kwargs)


def test_cache_on_a_pool_of_another_block_size_is_a_configuration_error() -> None:
    pool = BlockPool(4, 2, D)
    with pytest.raises(ConfigurationError, match=r"block_size 2.*asks for 3"):
        PagedKVCache(3, pool=pool)
    with pytest.raises(ConfigurationError, match="block_size"):
        PagedKVCache(pool=pool)  # the default block size (64) does not fit either
    cache = PagedKVCache(2, pool=pool)
    assert cache.device == pool.device and cache.dim == D and cache.shares_pool


# ---------------------------------------------------------------- caches sharing one pool


def test_two_caches_on_one_pool_get_interleaved_blocks_and_read_their_own_rows() -> None:
    pool = BlockPool(8, 2, D)
    a, b = PagedKVCache(2, pool=pool), PagedKVCache(2, pool=pool)
    appended: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"a": [], "b": []}
    for seed, (name, cache, n) in enumerate([("a", a, 2), ("b", b, 3), ("a", a, 3), ("b", b, 1), ("a", a, 1)]):
        k, v = rows(n, seed)
        cache.append(k, v)
        appended[name].append((k, v))
    assert a.block_table == [0, 3, 4] and b.block_table == [1, 2]
    assert (len(a), len(b), pool.num_tokens) == (6, 4, 10)
    for name, cache in (("a", a), ("b", b)):
        k, v = cache.get_kv()
        torch.testing.assert_close(k, torch.cat([k for k, _ in appended[name]]), rtol=0, atol=0)
        torch.testing.assert_close(v, torch.cat([v for _, v in appended[name]]), rtol=0, atol=0)


def test_release_returns_every_block_and_token() -> None:
    pool = BlockPool(6, 2, D)
    a, b = PagedKVCache(2, pool=pool), PagedKVCache(2, pool=pool)
    a.append(*rows(3, 1))
    b.append(*rows(4, 2))
    b_rows = b.get_kv()
    a.release()
    assert a.block_table == [] and len(a) == 0 and a.get_kv()[0].shape == (0, D)
    assert pool.ref_counts == [0, 0, 1, 1, 0, 0]
    assert pool.stats() == {"num_blocks": 6, "used_blocks": 2, "free_blocks": 4, "tokens_stored": 4, "unused_slots": 0}
    torch.testing.assert_close(b.get_kv()[0], b_rows[0], rtol=0, atol=0)  # the neighbour is untouched
    b.release()
    assert pool.num_used_blocks == 0 and pool.num_tokens == 0 and set(pool.ref_counts) == {0}
    a.append(*rows(1, 3))  # a released cache can be used again
    assert len(a) == 1 and len(a.block_table) == 1


@pytest.fixture
def write_spy(monkeypatch: pytest.MonkeyPatch) -> Counter[int]:
    """Counts ``BlockPool.write`` calls per pool (by ``id``)."""
    calls: Counter[int] = Counter()
    real_write = BlockPool.write

    def spy(self: BlockPool, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        calls[id(self)] += 1
        real_write(self, slots, k, v)

    monkeypatch.setattr(BlockPool, "write", spy)
    return calls


def test_append_batch_writes_once_per_shared_pool(write_spy: Counter[int]) -> None:
    pool = BlockPool(16, 3, D)
    caches = [PagedKVCache(3, pool=pool) for _ in range(4)]
    for i, c in enumerate(caches[:2]):
        c.append(*rows(i + 2, seed=10 + i))  # earlier rows, so new rows start mid-block
    write_spy.clear()
    batch = [(c, *rows(n, seed=i)) for i, (c, n) in enumerate(zip(caches, [1, 4, 3, 7]))]
    expected = [torch.cat([c.get_kv()[0], k]) for c, k, _ in batch]
    expected_v = [torch.cat([c.get_kv()[1], v]) for c, _, v in batch]
    append_batch(batch)
    assert write_spy == Counter({id(pool): 1})
    for c, k, v in zip(caches, expected, expected_v):
        torch.testing.assert_close(c.get_kv()[0], k, rtol=0, atol=0)
        torch.testing.assert_close(c.get_kv()[1], v, rtol=0, atol=0)
    assert pool.num_tokens == sum(len(c) for c in caches) == 2 + 3 + 1 + 4 + 3 + 7


def test_append_batch_mixing_pools_and_private_caches_stores_everything(write_spy: Counter[int]) -> None:
    pool_a, pool_b = BlockPool(16, 2, D), BlockPool(16, 5, D)
    private, dense = PagedKVCache(2), DenseKVCache(initial_capacity=1)
    caches: list[BaseKVCache] = [
        PagedKVCache(2, pool=pool_a), private, PagedKVCache(5, pool=pool_b), dense,
        PagedKVCache(2, pool=pool_a), PagedKVCache(5, pool=pool_b), PagedKVCache(2, pool=pool_a),
    ]
    reference: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in caches]
    for round_ in range(3):
        write_spy.clear()
        batch = [(c, *rows(1 + (i + round_) % 4, seed=100 * round_ + i)) for i, c in enumerate(caches)]
        append_batch(batch)
        assert private.pool is not None
        assert write_spy == Counter({id(pool_a): 1, id(pool_b): 1, id(private.pool): 1})
        for ref, (_, k, v) in zip(reference, batch):
            ref.append((k, v))
        for cache, ref in zip(caches, reference):
            k, v = cache.get_kv()
            torch.testing.assert_close(k, torch.cat([k for k, _ in ref]), rtol=0, atol=0)
            torch.testing.assert_close(v, torch.cat([v for _, v in ref]), rtol=0, atol=0)
    assert pool_a.num_tokens == sum(len(caches[i]) for i in (0, 4, 6))
    assert pool_b.num_tokens == len(caches[2]) + len(caches[5])


BAD_ITEMS: list[tuple[str, Callable[[], tuple[object, object]], type[Exception]]] = [
    ("wrong dim", lambda: rows(2, 0, d=D + 1), KVCacheError),
    ("zero rows", lambda: rows(0, 0), ValidationError),
    ("not a tensor", lambda: ([[0.0] * D], [[0.0] * D]), ValidationError),
    ("k/v shapes differ", lambda: (rows(2, 0)[0], rows(3, 0)[1]), ValidationError),
    ("integer rows", lambda: (torch.ones(2, D, dtype=torch.int64), torch.ones(2, D, dtype=torch.int64)),
     ValidationError),
]


@pytest.mark.parametrize(("case", "make_bad", "exc"), BAD_ITEMS, ids=[b[0] for b in BAD_ITEMS])
def test_a_bad_item_in_append_batch_stores_nothing_anywhere(
    case: str, make_bad: Callable[[], tuple[object, object]], exc: type[Exception]
) -> None:
    pool = BlockPool(12, 2, D)
    shared = [PagedKVCache(2, pool=pool) for _ in range(3)]
    private, dense = PagedKVCache(2), DenseKVCache()
    caches: list[BaseKVCache] = [*shared, private, dense]
    for i, c in enumerate(caches):
        c.append(*rows(i + 1, seed=i))
    before_pool = pool_state(pool)
    before = [
        (len(c), list(getattr(c, "block_table", [])), c.get_kv()[0].clone(), c.get_kv()[1].clone()) for c in caches
    ]
    bad_k, bad_v = make_bad()
    batch: list[tuple[Any, Any, Any]] = [(c, *rows(3, seed=50 + i)) for i, c in enumerate(caches)]
    batch.append((shared[1], bad_k, bad_v))  # last: after good items of every kind
    with pytest.raises(exc):
        append_batch(batch)
    assert_same_pool_state(before_pool, pool)
    for c, (n, table, k, v) in zip(caches, before):
        assert len(c) == n and list(getattr(c, "block_table", [])) == table
        torch.testing.assert_close(c.get_kv()[0], k, rtol=0, atol=0)
        torch.testing.assert_close(c.get_kv()[1], v, rtol=0, atol=0)


def test_append_batch_that_overflows_a_shared_pool_stores_nothing() -> None:
    pool = BlockPool(3, 2, D)
    a, b = PagedKVCache(2, pool=pool), PagedKVCache(2, pool=pool)
    with pytest.raises(CBLabMemoryError):
        append_batch([(a, *rows(4, 0)), (b, *rows(3, 1))])  # 2 + 2 blocks, 3 in the pool
    assert (len(a), a.block_table, len(b), b.block_table) == (0, [], 0, [])
    assert pool.num_used_blocks == 0 and pool.num_tokens == 0


def test_float16_pool_stores_compressed_rows() -> None:
    pool = BlockPool(4, 3, D, dtype=torch.float16)
    a, b = PagedKVCache(3, pool=pool), PagedKVCache(3, pool=pool)
    ka, va = rows(4, 1)
    kb, vb = rows(2, 2)
    append_batch([(a, ka, va), (b, kb, vb)])
    k, v = a.get_kv()
    assert k.dtype == v.dtype == torch.float16 and pool.key_cache.dtype == torch.float16
    torch.testing.assert_close(k, ka.half(), rtol=0, atol=0)
    torch.testing.assert_close(v, va.half(), rtol=0, atol=0)
    torch.testing.assert_close(b.get_kv()[0].float(), kb, rtol=1e-3, atol=1e-3)
    assert a.nbytes == 2 * 4 * D * 2 and pool.stats()["tokens_stored"] == 6


# ---------------------------------------------------------------- random sequences of appends and releases


class SharedPoolMachine(RuleBasedStateMachine):
    """Several caches on one fixed pool; a plain-Python model of every cache's rows checks the pool."""

    NUM_CACHES = 4

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(10, 3, D)
        self.caches = [PagedKVCache(3, pool=self.pool) for _ in range(self.NUM_CACHES)]
        self.model: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.caches]
        self.seed = 0

    def _rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.seed += 1
        return rows(n, self.seed)

    @rule(i=st.integers(0, NUM_CACHES - 1), n=st.integers(1, 8))
    def append(self, i: int, n: int) -> None:
        cache, k_v = self.caches[i], self._rows(n)
        if self.pool.can_allocate(cache.blocks_needed(n)):
            cache.append(*k_v)
            self.model[i].append(k_v)
        else:
            before = pool_state(self.pool)
            table, length = list(cache.block_table), len(cache)
            with pytest.raises(CBLabMemoryError):
                cache.append(*k_v)
            assert_same_pool_state(before, self.pool)
            assert cache.block_table == table and len(cache) == length

    @rule(picks=st.lists(st.tuples(st.integers(0, NUM_CACHES - 1), st.integers(1, 5)), min_size=1, max_size=4))
    def append_many(self, picks: list[tuple[int, int]]) -> None:
        needed = Counter[int]()
        for i, n in picks:  # the same cache may appear twice: its second item starts after the first
            needed[i] += n
        blocks = sum(self.caches[i].blocks_needed(n) for i, n in needed.items())
        batch = [(self.caches[i], *self._rows(n)) for i, n in picks]
        if not self.pool.can_allocate(blocks):  # too big for the pool: it must store nothing at all
            before = pool_state(self.pool)
            tables = [(list(c.block_table), len(c)) for c in self.caches]
            with pytest.raises(CBLabMemoryError):
                append_batch(batch)
            assert_same_pool_state(before, self.pool)
            assert [(list(c.block_table), len(c)) for c in self.caches] == tables
            return
        append_batch(batch)
        for (i, _), (_, k, v) in zip(picks, batch):
            self.model[i].append((k, v))

    @precondition(lambda self: any(len(c) for c in self.caches))
    @rule(i=st.integers(0, NUM_CACHES - 1))
    def release(self, i: int) -> None:
        self.caches[i].release()
        self.model[i] = []

    @invariant()
    def blocks_are_owned_once_or_free(self) -> None:
        pool, tables = self.pool, [c.block_table for c in self.caches]
        owned = [b for t in tables for b in t]
        assert len(owned) == len(set(owned)), f"a block is in two tables: {tables}"
        assert len(pool.free_block_ids) == len(set(pool.free_block_ids))
        assert not set(owned) & set(pool.free_block_ids)
        assert len(owned) + pool.num_free_blocks == pool.num_blocks
        counts = Counter(owned)
        assert pool.ref_counts == [counts[b] for b in range(pool.num_blocks)]
        assert min(pool.ref_counts) >= 0
        for c in self.caches:
            assert len(c.block_table) == -(-len(c) // c.block_size)  # only the last block may be partial

    @invariant()
    def rows_and_token_counts_match_the_model(self) -> None:
        assert self.pool.num_tokens == sum(len(c) for c in self.caches)
        for cache, ref in zip(self.caches, self.model):
            assert len(cache) == sum(k.shape[0] for k, _ in ref)
            if ref:
                k, v = cache.get_kv()
                torch.testing.assert_close(k, torch.cat([k for k, _ in ref]), rtol=0, atol=0)
                torch.testing.assert_close(v, torch.cat([v for _, v in ref]), rtol=0, atol=0)


SharedPoolMachine.TestCase.settings = settings(deadline=None, max_examples=40, stateful_step_count=25)
test_shared_pool_state_machine = SharedPoolMachine.TestCase
