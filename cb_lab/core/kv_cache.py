"""KV caches: where a request keeps the keys and values of every token it has seen.

Attention at position ``t`` needs the keys and values of positions ``0..t``; recomputing them
every step would make generation quadratic, so each request caches them and only ever
*appends* (one row per token, ``[T, D]`` for keys and for values). Two layouts, one interface
(:class:`BaseKVCache`): :class:`DenseKVCache`, one buffer per tensor that doubles when full
(amortized O(new rows) an append), and :class:`PagedKVCache`, fixed-size blocks of a
:class:`~cb_lab.core.block_pool.BlockPool` found through a *block table* (vLLM's PagedAttention).

``append_batch`` appends to many caches at once (one scatter per shared pool) in three phases
a step's commit runs apart: ``prepare_appends`` (validate, ``before_append`` hooks; stores
nothing), ``store_appends`` (write) and ``notify_appended`` (the ``after_append`` observers).
Malformed rows raise ``ValidationError``; rows that do not fit this cache (dim, device)
``KVCacheError``; a bad ``block_size`` / ``initial_capacity`` ``ConfigurationError``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

import torch

from cb_lab.checks import check_int
from cb_lab.core.block_pool import BlockPool, check_pool_capacity
from cb_lab.core.view_registry import render
from cb_lab.exceptions import ConfigurationError, KVCacheError, ValidationError

logger = logging.getLogger(__name__)

__all__ = [
    "Append", "BaseKVCache", "CacheHook", "DenseKVCache", "PagedKVCache", "append_batch", "check_rows",
    "notify_appended", "prepare_appends", "same_device", "shared_paged", "store_appends",
]


class CacheHook(Protocol):
    """What a cache calls around an append (``cb_lab.plugins.base.CachePlugin`` fits it)."""

    def before_append(
        self, cache: BaseKVCache, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def after_append(self, cache: BaseKVCache, num_rows: int, nbytes: int) -> None: ...


def same_device(a: torch.device, b: torch.device) -> bool:
    # torch.device("cuda") and torch.device("cuda:0") name the same place.
    return a == b or (a.type == b.type and (a.index is None or b.index is None or a.index == b.index))


def check_rows(
    k_new: object, v_new: object, dim: int | None, device: torch.device, holder: str = "this cache",
    num_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V rows ``[n, dim]`` each (n >= 1, or exactly ``num_rows``; floating point) that ``holder`` on
    ``device`` can store: ``ValidationError`` if they are malformed, ``KVCacheError`` if they do not fit
    (``dim`` None: any)."""
    if not isinstance(k_new, torch.Tensor) or not isinstance(v_new, torch.Tensor):
        raise ValidationError(
            f"K/V rows must be torch.Tensor, got {type(k_new).__name__} and {type(v_new).__name__}"
        )
    if k_new.dim() != 2 or k_new.shape != v_new.shape:
        raise ValidationError(
            f"K and V must both be [rows, dim] with equal shapes, got {tuple(k_new.shape)} "
            f"and {tuple(v_new.shape)}"
        )
    if num_rows is not None and k_new.shape[0] != num_rows:
        raise ValidationError(f"{holder}: expected {num_rows} K/V rows, got {k_new.shape[0]}")
    if k_new.shape[0] == 0:
        raise ValidationError("append at least one K/V row, got 0 rows")
    if not (k_new.is_floating_point() and v_new.is_floating_point()):
        raise ValidationError(f"K/V must be floating point, got {k_new.dtype} and {v_new.dtype}")
    if dim is not None and k_new.shape[1] != dim:
        raise KVCacheError(f"K/V rows have dim {k_new.shape[1]} but {holder} holds dim {dim}; use one cache per "
                           "request and one model dim")
    if not same_device(k_new.device, device) or not same_device(v_new.device, device):
        raise KVCacheError(f"K/V rows are on {k_new.device}/{v_new.device} but {holder} is on {device}; create "
                           "the cache on the model's device")
    return k_new, v_new


class BaseKVCache(ABC):
    """Append-only storage of one request's keys and values, ``[len, dim]`` each.

    ``append`` validates, runs the cache hooks, then stores; subclasses implement
    ``_store``, ``get_kv``, ``__len__`` and ``release`` (``nbytes`` has a default from
    ``get_kv``). ``append`` is concrete so that every kind validates and runs cache plugins the
    same way. ``dim`` and ``dtype`` are fixed by the first append (after hooks, so a compression
    hook chooses the storage dtype).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dim: int | None = None
        # Set by the Scheduler to its PluginManager's cache plugins (a live list).
        self.hooks: Sequence[CacheHook] = ()

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Append rows ``k_new, v_new`` (``[n, dim]`` each) after the stored ones."""
        append_batch([(self, k_new, v_new)])

    def _prepare(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate rows and run the ``before_append`` hooks; stores nothing."""
        return self._run_hooks(*check_rows(k_new, v_new, self.dim, self.device))

    def _run_hooks(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``before_append`` hooks, then their rows checked: the writes after them must not fail."""
        if not self.hooks:
            return k_new, v_new
        num_rows = k_new.shape[0]
        for hook in self.hooks:
            k_new, v_new = hook.before_append(self, k_new, v_new)
        return check_rows(k_new, v_new, self.dim, self.device, "this cache (rows from its before_append hooks)",
                          num_rows)

    def _after_append(self, num_rows: int, nbytes: int) -> None:
        for hook in self.hooks:
            hook.after_append(self, num_rows, nbytes)

    @abstractmethod
    def _store(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Write validated rows after the stored ones."""

    @abstractmethod
    def get_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored rows as ``(K, V)``, each ``[len, dim]``."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of token positions stored."""

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows (not of spare capacity)."""
        k, v = self.get_kv()
        return k.numel() * k.element_size() + v.numel() * v.element_size()

    @abstractmethod
    def release(self) -> None:
        """Drop every stored row and give the memory back; the cache is empty again."""

    @property
    def shared_pool(self) -> BlockPool | None:
        """The pool it shares with other requests' caches (None: it shares nothing, so is never short
        of blocks, shares no prefix and keeps its rows when its request finishes)."""
        return None


class DenseKVCache(BaseKVCache):
    """Contiguous K and V buffers that double in capacity when full.

    ``get_kv()`` returns *views* of the buffers, not copies: do not write into them.
    They stay valid after later appends (rows are never rewritten; growing copies into
    a new buffer and leaves the old one to the views that still point at it).
    """

    def __init__(self, device: torch.device | str | None = None, initial_capacity: int = 16) -> None:
        super().__init__(device)
        self.initial_capacity = check_int("initial_capacity", initial_capacity)
        self._k: torch.Tensor | None = None  # [capacity, D]
        self._v: torch.Tensor | None = None
        self._len = 0

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[0]

    def _store(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        needed = self._len + k_new.shape[0]
        if self._k is None or self._v is None:
            shape = (max(self.initial_capacity, needed), k_new.shape[1])
            self._k = torch.empty(shape, dtype=k_new.dtype, device=self.device)
            self._v = torch.empty(shape, dtype=k_new.dtype, device=self.device)
        elif needed > self._k.shape[0]:
            # Geometric growth: n appends cost O(n) copies in total.
            self._k = self._grown(self._k, max(needed, 2 * self._k.shape[0]))
            self._v = self._grown(self._v, self._k.shape[0])
        self._k[self._len : needed].copy_(k_new)
        self._v[self._len : needed].copy_(v_new)
        self._len = needed
        self.dim = k_new.shape[1]

    def release(self) -> None:
        self._k = self._v = None
        self._len = 0

    def _grown(self, buf: torch.Tensor, capacity: int) -> torch.Tensor:
        new = torch.empty((capacity, buf.shape[1]), dtype=buf.dtype, device=buf.device)
        new[: self._len].copy_(buf[: self._len])
        return new

    def get_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._k is None or self._v is None:
            empty = torch.empty((0, self.dim or 0), device=self.device)
            return empty, empty
        return self._k[: self._len], self._v[: self._len]

    def __len__(self) -> int:
        return self._len

    @property
    def nbytes(self) -> int:
        return 0 if self._k is None else 2 * self._len * self._k.shape[1] * self._k.element_size()

    def __repr__(self) -> str:
        return f"DenseKVCache(len={self._len}, capacity={self.capacity}, dim={self.dim}, device={self.device})"

    def _repr_html_(self) -> str:
        return render(self)


class PagedKVCache(BaseKVCache):
    """K/V stored in fixed-size blocks of a :class:`BlockPool`, found through ``block_table``.

    Position ``p`` lives in block ``block_table[p // block_size]`` at offset ``p % block_size``;
    only the last block is ever partly filled. Without ``pool`` the cache gets a private, growable
    pool at its first append; with a shared ``pool`` (fixed size, one per model) many requests'
    blocks live side by side. ``get_kv()`` gathers a copy; decode avoids it with paged attention.
    """

    def __init__(
        self, block_size: int = 64, device: torch.device | str | None = None, pool: BlockPool | None = None
    ) -> None:
        if pool is not None and device is None:
            device = pool.device
        super().__init__(device)
        check_int("block_size", block_size)
        if pool is not None and (pool.block_size != block_size or not same_device(pool.device, self.device)):
            raise ConfigurationError(
                f"the pool has block_size {pool.block_size} on {pool.device}, the cache asks for {block_size} on "
                f"{self.device}; use PagedKVCache(pool.block_size, pool.device, pool=pool)"
            )
        self.block_size = block_size
        self.pool = pool
        self.shares_pool = pool is not None
        self.dim = pool.dim if pool is not None else None
        self.block_table: list[int] = []
        self._len = 0

    @property
    def shared_pool(self) -> BlockPool | None:
        return self.pool if self.shares_pool else None

    def blocks_needed(self, num_rows: int) -> int:
        """Blocks an append of ``num_rows`` rows would take from the pool (a copy of a shared last block too)."""
        rows, bs = self._len + num_rows, self.block_size
        new_blocks = (rows + bs - 1) // bs - len(self.block_table)  # ceil(rows / block_size) - the blocks held
        return new_blocks + (1 if self._must_copy(num_rows) else 0)

    def _must_copy(self, num_rows: int) -> bool:
        """True when the next rows go into a partial last block another table shares (copy-on-write)."""
        partial = self._len % self.block_size != 0
        return num_rows > 0 and partial and self.pool is not None and self.pool.ref_counts[self.block_table[-1]] > 1

    def _claim_slots(self, num_rows: int) -> list[int]:
        """Allocate blocks for the next ``num_rows`` positions; returns their flat slots."""
        assert self.pool is not None, "a cache claims slots only once it has a pool"
        if self._must_copy(num_rows):  # the sharer's rows stay as they are; ours go into a copy
            self.block_table[-1] = self.pool.copy_on_write(self.block_table[-1])
        start, end, bs, table = self._len, self._len + num_rows, self.block_size, self.block_table
        missing = (end + bs - 1) // bs - len(table)  # the copy above is in the table already
        if missing > 0:
            table.extend(self.pool.allocate(missing))
        slots = [table[p // bs] * bs + p % bs for p in range(start, end)]  # position p's flat slot
        self._len = end
        self.pool.num_tokens += num_rows
        return slots

    def adopt(self, block_ids: Sequence[int], num_rows: int | None = None) -> None:
        """Start an empty cache from blocks of its pool that hold rows already: their first ``num_rows``
        rows (default all) are this cache's too. A prefix-cache hit adopts cached full blocks, a fork
        its parent's blocks; a shared partial last block is copied at the first write into it."""
        num_rows = len(block_ids) * self.block_size if num_rows is None else num_rows
        assert self.pool is not None and not self.block_table, "only an empty cache on a pool adopts blocks"
        assert -(-num_rows // self.block_size) == len(block_ids), "the blocks must hold exactly num_rows rows"
        self.pool.acquire(block_ids)
        self.block_table = list(block_ids)
        self._len = num_rows
        self.pool.num_tokens += num_rows

    def fork(self, num_rows: int | None = None) -> PagedKVCache:
        """A new cache on the same shared pool holding this one's first ``num_rows`` rows (default all).

        Nothing is copied: the two tables share every block, the last partial one too, until one
        of them writes into a shared block (``BlockPool.copy_on_write``).
        """
        num_rows = self._len if num_rows is None else num_rows
        if not self.shares_pool or self.pool is None:
            raise KVCacheError("only a PagedKVCache on a shared BlockPool can fork; create it with pool=...")
        if not 0 <= num_rows <= self._len:
            raise KVCacheError(f"a fork holds at most the cache's {self._len} rows, got num_rows={num_rows!r}")
        child = PagedKVCache(self.block_size, self.device, pool=self.pool)
        child.adopt(self.block_table[: -(-num_rows // self.block_size)], num_rows)
        return child

    def _ensure_pool(self, k_new: torch.Tensor) -> BlockPool:
        if self.pool is None:
            self.pool = BlockPool(4, self.block_size, k_new.shape[1], dtype=k_new.dtype, device=self.device,
                                  growable=True)
            self.dim = k_new.shape[1]
        return self.pool

    def _store(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        pool = self._ensure_pool(k_new)
        slots = torch.tensor(self._claim_slots(k_new.shape[0]), device=self.device)
        pool.write(slots, k_new, v_new)

    def get_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool is None:
            empty = torch.empty((0, self.dim or 0), device=self.device)
            return empty, empty
        k, v = self.pool.read(torch.tensor(self.block_table, device=self.device, dtype=torch.long))
        return k[: self._len], v[: self._len]  # [len, D]

    def release(self) -> None:
        """Give every block back to the pool (the rows are gone; the cache is empty again)."""
        if self.pool is not None:
            self.pool.free(self.block_table)
            self.pool.num_tokens -= self._len
        self.block_table = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    @property
    def nbytes(self) -> int:
        if self.pool is None:
            return 0
        return 2 * self._len * self.pool.dim * self.pool.key_cache.element_size()

    @property
    def num_blocks_used(self) -> int:
        return len(self.block_table)

    @property
    def num_blocks_free(self) -> int:
        """Free blocks of the pool this cache draws from (shared: free for every request)."""
        return 0 if self.pool is None else self.pool.num_free_blocks

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(len={self._len}, block_size={self.block_size}, "
            f"block_table={self.block_table}, free_blocks={self.num_blocks_free})"
        )

    def _repr_html_(self) -> str:
        return render(self)


Append = tuple[BaseKVCache, torch.Tensor, torch.Tensor]  # (cache, k_new [n, D], v_new [n, D])


def shared_paged(cache: BaseKVCache) -> PagedKVCache | None:
    """The cache itself when it draws from a shared pool, typed as what it is: only those share blocks."""
    return cache if isinstance(cache, PagedKVCache) and cache.shared_pool is not None else None


def append_batch(items: Sequence[Append]) -> None:
    """Append rows to several caches at once: every item validated (its ``before_append`` hooks
    run) and every shared pool checked for room before anything is stored, so a bad item stores
    nothing; then ``store_appends`` and ``notify_appended``."""
    prepared = prepare_appends(items)
    check_pool_capacity([(cache, k.shape[0]) for cache, k, _ in prepared])
    notify_appended(prepared, store_appends(prepared))


def prepare_appends(items: Sequence[Append], *, checked: bool = False) -> list[Append]:
    """Validate every item (not when ``checked``: a commit's rows, which its executor checked for the whole
    step at once) and run its ``before_append`` hooks (which may replace the rows); stores nothing."""
    return [(cache, *(cache._run_hooks(k, v) if checked else cache._prepare(k, v))) for cache, k, v in items]


def store_appends(prepared: Sequence[Append]) -> list[int]:
    """Store prepared rows, with no hook; returns the bytes each item takes in its cache.

    Rows of caches that share one ``BlockPool`` are scattered with one indexed write per pool
    (vLLM's ``slot_mapping``). The caller has checked the pools have room.
    """
    stored: list[int] = []
    by_pool: dict[int, list[tuple[PagedKVCache, torch.Tensor, torch.Tensor]]] = {}
    for cache, k, v in prepared:
        paged = shared_paged(cache)
        if paged is not None and paged.pool is not None:
            by_pool.setdefault(id(paged.pool), []).append((paged, k, v))
            stored.append(k.shape[0] * paged.pool.row_nbytes)  # in the pool's dtype, whatever k's
        else:
            before = cache.nbytes
            cache._store(k, v)
            stored.append(cache.nbytes - before)
    for group in by_pool.values():
        pool = group[0][0].pool
        assert pool is not None
        slots = [slot for cache, k, _ in group for slot in cache._claim_slots(k.shape[0])]
        pool.write(torch.tensor(slots, device=pool.device), torch.cat([k for _, k, _ in group]),
                   torch.cat([v for _, _, v in group]))
    return stored


def notify_appended(prepared: Sequence[Append], stored: Sequence[int]) -> None:
    """Run the ``after_append`` hooks: observers, called once the rows are in."""
    for (cache, k, _), nbytes in zip(prepared, stored, strict=True):
        if cache.hooks:  # most caches have none: a step skips a call per request
            cache._after_append(k.shape[0], nbytes)
