"""DenseKVCache and PagedKVCache: round trips, growth, block addressing, hooks, validation."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_oracle, make_model

from cb_lab.core.kv_cache import BaseKVCache, DenseKVCache, PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.exceptions import ConfigurationError, KVCacheError, ValidationError

D = 4
# (kind, block_size); block_size is ignored for dense.
LAYOUTS = [("dense", None), ("paged", 1), ("paged", 3), ("paged", 7), ("paged", 64)]
LAYOUT_IDS = ["dense", "paged-bs1", "paged-bs3", "paged-bs7", "paged-bs64"]


def new_cache(kind: str, block_size: int | None = None) -> BaseKVCache:
    return DenseKVCache() if kind == "dense" else PagedKVCache(block_size=block_size or 4)


def rows(n: int, seed: int, dim: int = D, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=dtype), torch.randn(n, dim, generator=g, dtype=dtype)


def fill(cache: BaseKVCache, sizes: list[int], dim: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    """Append chunks of the given sizes; return the torch.cat reference of everything appended."""
    ks, vs = [], []
    for i, n in enumerate(sizes):
        k, v = rows(n, seed=100 + i, dim=dim)
        cache.append(k, v)
        ks.append(k)
        vs.append(v)
    return torch.cat(ks), torch.cat(vs)


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize(("kind", "bs"), LAYOUTS, ids=LAYOUT_IDS)
def test_append_get_kv_round_trip_matches_cat(kind: str, bs: int | None) -> None:
    cache = new_cache(kind, bs)
    ks: list[torch.Tensor] = []
    vs: list[torch.Tensor] = []
    for i, n in enumerate([1, 3, 7, 2, 16, 1, 5]):
        k, v = rows(n, seed=i)
        cache.append(k, v)
        ks.append(k)
        vs.append(v)
        got_k, got_v = cache.get_kv()
        assert len(cache) == sum(t.shape[0] for t in ks)
        assert cache.dim == D
        torch.testing.assert_close(got_k, torch.cat(ks), rtol=0, atol=0)
        torch.testing.assert_close(got_v, torch.cat(vs), rtol=0, atol=0)


@pytest.mark.parametrize(("kind", "bs"), LAYOUTS, ids=LAYOUT_IDS)
def test_empty_cache(kind: str, bs: int | None) -> None:
    cache = new_cache(kind, bs)
    k, v = cache.get_kv()
    assert len(cache) == 0 and cache.dim is None and cache.nbytes == 0
    assert k.shape == (0, 0) and v.shape == (0, 0)
    assert cache.device == torch.device("cpu")


@pytest.mark.parametrize("kind", ["dense", "paged"])
def test_many_single_row_appends(kind: str) -> None:
    cache = DenseKVCache(initial_capacity=1) if kind == "dense" else PagedKVCache(block_size=2)
    k_ref, v_ref = fill(cache, [1] * 100)
    k, v = cache.get_kv()
    assert len(cache) == 100
    torch.testing.assert_close(k, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=0)


# ---------------------------------------------------------------- dense growth
def test_dense_capacity_doubles_and_values_survive_growth() -> None:
    cache = DenseKVCache(initial_capacity=2)
    ks, vs, capacities = [], [], []
    for i in range(40):
        k, v = rows(1, seed=i)
        cache.append(k, v)
        ks.append(k)
        vs.append(v)
        capacities.append(cache.capacity)
        got_k, got_v = cache.get_kv()
        torch.testing.assert_close(got_k, torch.cat(ks), rtol=0, atol=0)
        torch.testing.assert_close(got_v, torch.cat(vs), rtol=0, atol=0)
    # capacity after l rows: 2 until full, then the next power of two (geometric growth)
    expected = [max(2, 2 ** math.ceil(math.log2(n))) for n in range(1, 41)]
    assert capacities == expected
    assert len(set(capacities)) == 6  # 2, 4, 8, 16, 32, 64: O(log n) reallocations


def test_dense_growth_takes_a_big_append_in_one_go() -> None:
    cache = DenseKVCache(initial_capacity=2)
    fill(cache, [1])
    assert cache.capacity == 2
    k_ref, v_ref = fill(DenseKVCache(), [1])  # fill() seeds by chunk index: the same row as above
    k_big, v_big = rows(10, seed=7)
    cache.append(k_big, v_big)
    assert cache.capacity == 11  # max(needed, 2 * capacity) = max(11, 4)
    k, v = cache.get_kv()
    torch.testing.assert_close(k, torch.cat([k_ref, k_big]), rtol=0, atol=0)
    torch.testing.assert_close(v, torch.cat([v_ref, v_big]), rtol=0, atol=0)


def test_dense_default_initial_capacity_and_large_first_append() -> None:
    small = DenseKVCache()
    fill(small, [1])
    assert small.capacity == 16
    large = DenseKVCache(initial_capacity=4)
    fill(large, [9])
    assert large.capacity == 9 and len(large) == 9


def test_dense_get_kv_returns_views_that_survive_growth() -> None:
    cache = DenseKVCache(initial_capacity=2)
    k_ref, v_ref = fill(cache, [2])
    k_view, v_view = cache.get_kv()
    k_again, _ = cache.get_kv()
    assert k_view.data_ptr() == k_again.data_ptr()  # views of one buffer, not clones
    fill(cache, [5, 9])  # forces two growths
    assert cache.capacity >= 16
    torch.testing.assert_close(k_view, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(v_view, v_ref, rtol=0, atol=0)
    k_now, _ = cache.get_kv()
    torch.testing.assert_close(k_now[:2], k_ref, rtol=0, atol=0)


def test_dense_view_unchanged_by_append_without_growth() -> None:
    cache = DenseKVCache(initial_capacity=32)
    k_ref, v_ref = fill(cache, [3])
    k_view, v_view = cache.get_kv()
    fill(cache, [4, 4])
    assert cache.capacity == 32  # no growth: the new rows went into the same buffer
    assert k_view.shape == (3, D)
    torch.testing.assert_close(k_view, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(v_view, v_ref, rtol=0, atol=0)


# ---------------------------------------------------------------- paged layout
@pytest.mark.parametrize("bs", [1, 3, 7])
@pytest.mark.parametrize("sizes", [[1], [2, 5, 1, 9], [7], [3, 3, 3, 3, 3, 1], [21, 1]])
def test_paged_block_table_and_slot_addressing(bs: int, sizes: list[int]) -> None:
    cache = PagedKVCache(block_size=bs)
    k_ref, v_ref = fill(cache, sizes)
    n = len(cache)
    assert n == sum(sizes)
    assert cache.num_blocks_used == len(cache.block_table) == math.ceil(n / bs)
    assert len(set(cache.block_table)) == len(cache.block_table)  # no block used twice
    alloc = cache.pool
    assert alloc is not None and alloc.block_size == bs
    assert cache.num_blocks_free == alloc.num_blocks - len(cache.block_table)
    for p in range(n):
        block, slot = cache.block_table[p // bs], p % bs
        torch.testing.assert_close(alloc.key_cache[0, block, slot], k_ref[p], rtol=0, atol=0)
        torch.testing.assert_close(alloc.value_cache[0, block, slot], v_ref[p], rtol=0, atol=0)


def test_paged_pool_growth_keeps_earlier_rows() -> None:
    cache = PagedKVCache(block_size=1)
    k0, v0 = fill(cache, [2])
    assert cache.pool is not None
    first_pool = cache.pool.num_blocks
    k_ref, v_ref = fill(cache, [1] * 18)
    k_ref, v_ref = torch.cat([k0, k_ref]), torch.cat([v0, v_ref])
    alloc = cache.pool
    assert alloc.num_blocks > first_pool and alloc.num_blocks >= 20
    assert sorted(cache.block_table) == list(range(20))
    k, v = cache.get_kv()
    torch.testing.assert_close(k, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=0)
    for p, block in enumerate(cache.block_table):
        torch.testing.assert_close(alloc.key_cache[0, block, 0], k_ref[p], rtol=0, atol=0)


def test_paged_get_kv_is_a_copy() -> None:
    cache = PagedKVCache(block_size=3)
    k_ref, _ = fill(cache, [4])
    k, _ = cache.get_kv()
    k.zero_()  # writing into the gathered copy must not touch the blocks
    k_again, _ = cache.get_kv()
    torch.testing.assert_close(k_again, k_ref, rtol=0, atol=0)


# ---------------------------------------------------------------- nbytes
@pytest.mark.parametrize(("kind", "bs"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize(("dtype", "itemsize"), [(torch.float32, 4), (torch.float64, 8), (torch.float16, 2)])
def test_nbytes_counts_stored_rows_only(kind: str, bs: int | None, dtype: torch.dtype, itemsize: int) -> None:
    cache = new_cache(kind, bs)
    for i, n in enumerate([1, 4]):
        k, v = rows(n, seed=i, dim=6, dtype=dtype)
        cache.append(k, v)
    assert cache.nbytes == 2 * 5 * 6 * itemsize  # K and V, 5 rows, dim 6; no spare capacity


# ---------------------------------------------------------------- hooks
class RecordingHook:
    """A cache hook that logs every call and transforms rows with ``fn``."""

    def __init__(self, name: str, log: list, fn=lambda t: t) -> None:
        self.name, self.log, self.fn = name, log, fn

    def before_append(self, cache, k_new, v_new):
        self.log.append((self.name, "before", cache, len(cache), k_new.clone(), v_new.clone()))
        return self.fn(k_new), self.fn(v_new)

    def after_append(self, cache, num_rows, nbytes):
        self.log.append((self.name, "after", cache, len(cache), num_rows))


@pytest.mark.parametrize(("kind", "bs"), LAYOUTS[:3], ids=LAYOUT_IDS[:3])
def test_hooks_run_in_order_around_append_and_transform_rows(kind: str, bs: int | None) -> None:
    cache = new_cache(kind, bs)
    log: list = []
    cache.hooks = [RecordingHook("plus1", log, lambda t: t + 1), RecordingHook("times2", log, lambda t: t * 2)]
    k1, v1 = rows(3, seed=1)
    k2, v2 = rows(2, seed=2)
    cache.append(k1, v1)
    cache.append(k2, v2)
    calls = [(name, when) for name, when, *_ in log]
    assert calls == [("plus1", "before"), ("times2", "before"), ("plus1", "after"), ("times2", "after")] * 2
    assert all(entry[2] is cache for entry in log)
    # before: sees the cache as it was; the second hook sees the first one's output
    assert log[0][3] == 0 and log[4][3] == 3
    torch.testing.assert_close(log[0][4], k1, rtol=0, atol=0)
    torch.testing.assert_close(log[1][4], k1 + 1, rtol=0, atol=0)
    torch.testing.assert_close(log[1][5], v1 + 1, rtol=0, atol=0)
    # after: the rows are stored, num_rows is the appended count
    assert [(e[3], e[4]) for e in log if e[1] == "after"] == [(3, 3), (3, 3), (5, 2), (5, 2)]
    k, v = cache.get_kv()
    torch.testing.assert_close(k, (torch.cat([k1, k2]) + 1) * 2)
    torch.testing.assert_close(v, (torch.cat([v1, v2]) + 1) * 2)


@pytest.mark.parametrize(("kind", "bs"), LAYOUTS[:2], ids=LAYOUT_IDS[:2])
def test_hook_that_raises_before_append_stores_nothing(kind: str, bs: int | None) -> None:
    cache = new_cache(kind, bs)
    k_ref, v_ref = fill(cache, [3])

    class Boom:
        def before_append(self, cache, k_new, v_new):
            raise RuntimeError("boom")

        def after_append(self, cache, num_rows, nbytes):  # pragma: no cover - never reached
            raise AssertionError("after_append ran after a failed before_append")

    cache.hooks = [Boom()]
    with pytest.raises(RuntimeError, match="boom"):
        cache.append(*rows(2, seed=9))
    assert len(cache) == 3
    k, v = cache.get_kv()
    torch.testing.assert_close(k, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=0)


def test_hooks_not_called_for_invalid_rows() -> None:
    log: list = []
    cache = DenseKVCache()
    cache.hooks = [RecordingHook("h", log)]
    with pytest.raises(ValidationError):
        cache.append(torch.zeros(0, D), torch.zeros(0, D))
    assert log == []


# ---------------------------------------------------------------- validation
def _k(*shape, dtype=torch.float32, device="cpu"):
    return torch.ones(*shape, dtype=dtype, device=device)


BAD_ROWS = [
    pytest.param(lambda: ([[1.0] * D], _k(1, D)), ValidationError, "list", id="k-not-tensor"),
    pytest.param(lambda: (_k(1, D), None), ValidationError, "NoneType", id="v-not-tensor"),
    pytest.param(lambda: (_k(D), _k(D)), ValidationError, f"({D},)", id="1-d"),
    pytest.param(lambda: (_k(1, 1, D), _k(1, 1, D)), ValidationError, f"(1, 1, {D})", id="3-d"),
    pytest.param(lambda: (_k(2, D), _k(3, D)), ValidationError, f"(3, {D})", id="kv-row-mismatch"),
    pytest.param(lambda: (_k(2, D), _k(2, D + 1)), ValidationError, f"(2, {D + 1})", id="kv-dim-mismatch"),
    pytest.param(lambda: (_k(0, D), _k(0, D)), ValidationError, "0 rows", id="zero-rows"),
    pytest.param(lambda: (_k(2, D, dtype=torch.int64), _k(2, D)), ValidationError, "torch.int64", id="int-k"),
    pytest.param(lambda: (_k(2, D), _k(2, D, dtype=torch.int32)), ValidationError, "torch.int32", id="int-v"),
    pytest.param(lambda: (_k(2, D, dtype=torch.bool), _k(2, D, dtype=torch.bool)), ValidationError, "torch.bool",
                 id="bool"),
    pytest.param(lambda: (_k(2, D + 2), _k(2, D + 2)), KVCacheError, f"dim {D + 2}", id="dim-vs-stored"),
    pytest.param(lambda: (_k(2, D, device="meta"), _k(2, D, device="meta")), KVCacheError, "meta", id="device-k-v"),
    pytest.param(lambda: (_k(2, D), _k(2, D, device="meta")), KVCacheError, "meta", id="device-v-only"),
]


@pytest.mark.parametrize(("kind", "bs"), LAYOUTS[:3], ids=LAYOUT_IDS[:3])
@pytest.mark.parametrize(("make_rows", "exc", "needle"), BAD_ROWS)
def test_bad_append_raises_and_leaves_cache_unchanged(kind, bs, make_rows, exc, needle) -> None:
    cache = new_cache(kind, bs)
    k_ref, v_ref = fill(cache, [3])
    nbytes = cache.nbytes
    with pytest.raises(exc) as info:
        cache.append(*make_rows())
    assert needle in str(info.value)
    assert len(cache) == 3 and cache.dim == D and cache.nbytes == nbytes
    k, v = cache.get_kv()
    torch.testing.assert_close(k, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=0)
    # ... and the cache still works afterwards
    k2, v2 = rows(2, seed=55)
    cache.append(k2, v2)
    k, v = cache.get_kv()
    torch.testing.assert_close(k, torch.cat([k_ref, k2]), rtol=0, atol=0)
    torch.testing.assert_close(v, torch.cat([v_ref, v2]), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["dense", "paged"])
def test_device_mismatch_on_empty_cache_is_kv_cache_error(kind: str) -> None:
    cache = new_cache(kind, 4)
    with pytest.raises(KVCacheError, match="meta"):
        cache.append(torch.empty(2, 4, device="meta"), torch.empty(2, 4, device="meta"))
    assert len(cache) == 0 and cache.dim is None


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4", None])
def test_bad_block_size(bad: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        PagedKVCache(block_size=bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", [0, -3, 2.0, False, "16"])
def test_bad_initial_capacity(bad: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        DenseKVCache(initial_capacity=bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")])
def test_device_argument_is_normalised(device) -> None:
    for cache in (DenseKVCache(device), PagedKVCache(4, device)):
        assert cache.device == torch.device("cpu")
        k, v = rows(2, seed=1)
        cache.append(k, v)
        torch.testing.assert_close(cache.get_kv()[0], k, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["dense", "paged"])
def test_device_with_index_is_the_same_device(kind: str) -> None:
    """'cpu:0' and 'cpu' name the same place: rows on either are accepted (see _same_device)."""
    cache = DenseKVCache("cpu:0") if kind == "dense" else PagedKVCache(2, "cpu:0")
    k, v = rows(3, seed=4)
    cache.append(k, v)
    torch.testing.assert_close(cache.get_kv()[0], k, rtol=0, atol=0)
    torch.testing.assert_close(cache.get_kv()[1], v, rtol=0, atol=0)


def test_a_cache_written_to_the_spec_shape_works_in_the_scheduler() -> None:
    """The spec's three methods plus ``release`` (preemption and abort need it) and ``_store``:
    ``append`` itself stays in the base class, so validation and cache plugins run for every kind."""
    class ListKVCache(BaseKVCache):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []

        def _store(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
            self.rows.append((k_new.clone(), v_new.clone()))
            self.dim = k_new.shape[1]

        def get_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.rows:
                return torch.empty(0, self.dim or 0), torch.empty(0, self.dim or 0)
            return torch.cat([k for k, _ in self.rows]), torch.cat([v for _, v in self.rows])

        def __len__(self) -> int:
            return sum(k.shape[0] for k, _ in self.rows)

        def release(self) -> None:
            self.rows.clear()

    model = make_model(8)
    sched = Scheduler(model, 5, 3)
    reqs = [Request(f"r{i}", torch.randn(L, 8), n, ListKVCache()) for i, (L, n) in enumerate([(7, 4), (3, 6)])]
    for r in reqs:
        sched.add_request(r)
    sched.run_until_complete()
    for r in reqs:
        assert_oracle(model, r)
        assert r.kv_cache.nbytes == 2 * len(r.kv_cache) * 8 * 4  # the default nbytes, from get_kv
    with pytest.raises(ValidationError):
        reqs[0].kv_cache.append(torch.ones(1, 8), torch.ones(2, 8))  # the base class still validates
