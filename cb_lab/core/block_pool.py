"""The KV block pool: fixed-size blocks of K/V storage, handed out by id (vLLM's BlockPool).

One K tensor and one V tensor hold every block. A request's cache owns a *block table* (a list of
block ids); position ``p`` of that request lives at ``(block_table[p // block_size], p % block_size)``,
a flat *slot* ``block_id * block_size + offset``.

::

    key_cache  [num_layers, num_blocks, block_size, layer_dim]    free_block_ids  [5, 6, 7]
    layer 0:  block 0  a0 a1 a2 a3   <- request a: block_table [0, 3]
              block 1  b0 b1 b2 b3   <- request b: block_table [1, 2, 4]
              ...
    layer 1:  block 0  a0 a1 a2 a3   (the same blocks, the next layer's K/V)

A cache row (what a cache appends, ``[dim]``) holds a token's K (or V) of every layer side by side,
``[num_layers, layer_dim]`` flattened, so one block table serves every layer. The pool stores them
layer by layer (as vLLM and nano-vllm do): a model's attention reads one layer at a time, and one
layer's blocks are then contiguous memory. TinyLLM has one layer: ``key_cache[0]`` is its
``[num_blocks, block_size, D]``.

Every block has a reference count: the number of block tables holding it. ``free`` lowers
it, and a block whose count reaches 0 is free again. A pool shared by many requests has a
fixed size and raises ``MemoryError`` (cb-lab's) when it runs out; a private pool may grow.

**Prefix caching** (vLLM's automatic prefix caching, nano-vllm's block hashes): a *full* block
can be registered under a hash of its contents and of everything before it
(``cache_block``). When its last holder lets go, it keeps its rows and its hash and joins an
LRU list of *evictable* blocks instead of the free list, so a later request with the same
prefix can take it back (``lookup``, ``acquire``). ``allocate`` takes truly free blocks first,
then evicts the least recently used cached block (forgetting its hash). A block in use is
never evicted. So every block is exactly one of: free, in use, evictable.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch

from cb_lab.checks import check_int
from cb_lab.core.view_registry import render
from cb_lab.exceptions import ConfigurationError, ValidationError
from cb_lab.exceptions import MemoryError as CBLabMemoryError

if TYPE_CHECKING:  # the caches import this module; the ledger only reads them
    from cb_lab.core.kv_cache import BaseKVCache, PagedKVCache

logger = logging.getLogger(__name__)

__all__ = ["BlockLedger", "BlockPool", "block_hashes", "check_pool_capacity"]


def block_hashes(rows: torch.Tensor, block_size: int) -> list[int]:
    """The chained hash of every full block of ``rows`` (``[T]`` ids or ``[T, D]`` vectors)."""
    data = rows.detach().cpu().contiguous()
    prefix = f"{data.dtype}:{tuple(data.shape[1:])}".encode()  # ids and vectors never collide
    hashes: list[int] = []
    for start in range(0, data.shape[0] - block_size + 1, block_size):
        h = hashlib.blake2b(prefix, digest_size=8)
        h.update(hashes[-1].to_bytes(8, "little") if hashes else b"")
        h.update(data[start : start + block_size].numpy().tobytes())
        hashes.append(int.from_bytes(h.digest(), "little"))
    return hashes


class BlockPool:
    """``num_blocks`` KV blocks of ``block_size`` slots for ``dim``-wide rows, a free list and ref counts.

    ``num_layers`` says how a row splits into layers (``dim`` must divide by it); the storage is
    layer-major, ``key_cache [num_layers, num_blocks, block_size, dim // num_layers]``.
    ``growable=True`` doubles the pool instead of failing when it runs out (block ids stay
    valid); that is how a ``PagedKVCache`` without a shared pool gets its private one.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        dim: int,
        *,
        num_layers: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        growable: bool = False,
    ) -> None:
        check_int("num_blocks", num_blocks)
        self.block_size = check_int("block_size", block_size)
        self.dim = check_int("dim", dim)
        self.num_layers = check_int("num_layers", num_layers)
        if dim % num_layers:
            raise ConfigurationError(f"dim {dim} does not split into num_layers={num_layers} equal parts; a row holds "
                                     "every layer's K (or V) side by side, so dim must be a multiple of num_layers")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.growable = growable
        shape = (num_layers, num_blocks, block_size, dim // num_layers)
        self.key_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.value_cache = torch.zeros_like(self.key_cache)
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out the lowest id
        self.num_tokens = 0  # rows stored by the caches using this pool (they keep it up to date)
        # Prefix caching: full blocks by content hash, and the cached blocks nobody holds (LRU first).
        self.block_hashes: dict[int, int] = {}  # block id -> its hash
        self.cached_blocks: dict[int, int] = {}  # hash -> block id
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref count 0, rows kept; oldest first
        self.num_evictions = 0
        self.num_copies = 0  # copy_on_write calls

    @property
    def num_blocks(self) -> int:
        return self.key_cache.shape[1]

    @property
    def row_nbytes(self) -> int:
        """Bytes one cache row takes in the pool: its K and its V, every layer."""
        return 2 * self.dim * self.key_cache.element_size()

    @property
    def num_free_blocks(self) -> int:
        """Blocks an ``allocate`` can hand out: truly free ones plus evictable cached ones."""
        return len(self.free_block_ids) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks some block table holds."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_evictable_blocks(self) -> int:
        return len(self.evictable)

    @property
    def num_unused_slots(self) -> int:
        """Slots in used blocks that hold no row: the paged layout's only waste."""
        return self.num_used_blocks * self.block_size - self.num_tokens

    def can_allocate(self, num_blocks: int) -> bool:
        return self.growable or check_int("num_blocks", num_blocks, 0, ValidationError) <= self.num_free_blocks

    def allocate(self, num_blocks: int = 1) -> list[int]:
        """Take ``num_blocks`` free blocks (ref count 1 each); raises MemoryError when there are too few."""
        if check_int("num_blocks", num_blocks, 0, ValidationError) > self.num_free_blocks:
            if not self.growable:
                raise CBLabMemoryError(
                    f"KV block pool exhausted: {num_blocks} block(s) needed, {self.num_free_blocks} free of "
                    f"{self.num_blocks}; create the BlockPool with more num_blocks or run fewer requests at once"
                )
            self._grow(max(self.num_blocks, num_blocks))
        while len(self.free_block_ids) < num_blocks:  # evict the least recently used cached blocks
            victim, _ = self.evictable.popitem(last=False)
            del self.cached_blocks[self.block_hashes.pop(victim)]
            self.free_block_ids.append(victim)
            self.num_evictions += 1
        ids = [self.free_block_ids.pop() for _ in range(num_blocks)]
        for block_id in ids:
            assert self.ref_counts[block_id] == 0, f"block {block_id} was free but referenced"
            self.ref_counts[block_id] = 1
        return ids

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block; a block with no reference left is free again.

        All or nothing: if any id is not held (often enough), nothing is freed.
        """
        drops = Counter(block_ids)
        for block_id, n in drops.items():
            if not isinstance(block_id, int) or not 0 <= block_id < self.num_blocks or self.ref_counts[block_id] < n:
                raise ValidationError(
                    f"block {block_id!r} is not allocated in this pool (or freed more often than held); "
                    "free only blocks you own"
                )
        for block_id in block_ids:
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0 and block_id in self.block_hashes:
                self.evictable[block_id] = None  # keeps its rows and hash; the most recently used go last
            elif self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)

    def cache_block(self, block_id: int, block_hash: int) -> None:
        """Register a full block in use under ``block_hash`` (a block with those contents already cached wins)."""
        assert self.ref_counts[block_id] > 0, f"only a block in use can be cached, not block {block_id}"
        if block_hash not in self.cached_blocks and block_id not in self.block_hashes:
            self.cached_blocks[block_hash] = block_id
            self.block_hashes[block_id] = block_hash

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """The cached blocks of the longest chain of ``hashes`` (a prefix's full blocks, in order)."""
        hit = []
        for h in hashes:
            if h not in self.cached_blocks:
                break
            hit.append(self.cached_blocks[h])
        return hit

    def acquire(self, block_ids: Sequence[int]) -> None:
        """Take one more reference to each block in use or cached (an evictable one is in use again)."""
        for block_id in block_ids:
            assert self.ref_counts[block_id] > 0 or block_id in self.evictable, f"block {block_id} is free"
            self.evictable.pop(block_id, None)
            self.ref_counts[block_id] += 1

    def copy_on_write(self, block_id: int) -> int:
        """A private copy of a shared block for a holder about to write into it; returns the copy's id.

        The holder's reference moves from ``block_id`` to the copy, so the other holders' rows
        never change. Called on the first write into a shared partial block (a fork's last
        block), once: after it each holder writes into its own block.
        """
        assert self.ref_counts[block_id] > 1, f"block {block_id} is not shared; write into it in place"
        (copy,) = self.allocate(1)
        self.key_cache[:, copy] = self.key_cache[:, block_id]  # every layer's rows of the block
        self.value_cache[:, copy] = self.value_cache[:, block_id]
        self.ref_counts[block_id] -= 1
        self.num_copies += 1
        return copy

    def _grow(self, extra: int) -> None:
        old = self.num_blocks
        L, _, bs, w = self.key_cache.shape
        self.key_cache = torch.cat([self.key_cache, self.key_cache.new_zeros((L, extra, bs, w))], dim=1)
        self.value_cache = torch.cat([self.value_cache, self.value_cache.new_zeros((L, extra, bs, w))], dim=1)
        self.ref_counts.extend([0] * extra)
        self.free_block_ids = list(range(old + extra - 1, old - 1, -1)) + self.free_block_ids
        logger.debug("block pool grew from %d to %d blocks", old, old + extra)

    def write(self, slots: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor) -> None:
        """Scatter rows ``[n, dim]`` to flat slots ``[n]`` (``block_id * block_size + offset``) in one op each:
        every layer's part of a row goes to the same slot of that layer."""
        for cache, rows in ((self.key_cache, k_rows), (self.value_cache, v_rows)):
            L, w = self.num_layers, cache.shape[-1]
            by_slot = cache.view(L, -1, w).permute(1, 0, 2)  # [num_blocks * block_size, L, w], a view
            by_slot[slots] = rows.reshape(-1, L, w).to(cache.dtype)

    def read(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row of blocks ``block_ids [n]``, in order, as cache rows ``(K, V)`` ``[n * block_size, dim]``
        each (a copy: the layers are put side by side again)."""
        k, v = self.key_cache[:, block_ids], self.value_cache[:, block_ids]  # [L, n, block_size, w]
        return k.permute(1, 2, 0, 3).reshape(-1, self.dim), v.permute(1, 2, 0, 3).reshape(-1, self.dim)

    def stats(self) -> dict[str, int]:
        """Counts; ``free_blocks`` includes the evictable cached ones (``allocate`` can take them)."""
        return {
            "num_blocks": self.num_blocks,
            "used_blocks": self.num_used_blocks,
            "free_blocks": self.num_free_blocks,
            "tokens_stored": self.num_tokens,
            "unused_slots": self.num_unused_slots,
        }

    def cache_stats(self) -> dict[str, int]:
        """Prefix caching: blocks cached (in use or evictable), evictable, evictions, copy-on-write copies."""
        return {
            "cached_blocks": len(self.cached_blocks),
            "evictable_blocks": self.num_evictable_blocks,
            "evictions": self.num_evictions,
            "copies": self.num_copies,
        }

    def __repr__(self) -> str:
        layers = f", num_layers={self.num_layers}" if self.num_layers > 1 else ""
        return (
            f"BlockPool(blocks={self.num_used_blocks}/{self.num_blocks} used, block_size={self.block_size}, "
            f"dim={self.dim}{layers}, tokens={self.num_tokens})"
        )

    def _repr_html_(self) -> str:
        return render(self)


class BlockLedger:
    """The free blocks of each shared pool as a plan would leave them; nothing is allocated.

    A block is free when no block table would hold it: its ref count, plus the references the
    ledger added (a prefix hit takes its cached blocks back), minus those it dropped (a preempted
    victim lets go of its blocks). So a victim's block that another table shares stays in use, and
    a hit block nobody held (an evictable one) uses up a free block. Caches without a shared pool,
    and growable pools, always fit.
    """

    def __init__(self) -> None:
        self.pools: dict[int, BlockPool] = {}  # the shared pools seen, by id
        self.free: dict[int, int] = {}  # id(pool) -> its free blocks as the plan leaves them
        self._refs: dict[int, Counter[int]] = {}  # id(pool) -> block -> references added (< 0: dropped)

    def fits(self, cache: BaseKVCache, num_rows: int, cached: Sequence[int] = ()) -> bool:
        """Room for ``num_rows`` more rows of ``cache``, after it takes back the prefix-cache blocks ``cached``."""
        pool = self._track(cache)
        if pool is None or pool.growable:
            return True
        hits = self._unheld(pool, cached) if cached else 0
        return cast("PagedKVCache", cache).blocks_needed(num_rows) + hits <= self.free[id(pool)]

    def take(self, cache: BaseKVCache, num_rows: int, cached: Sequence[int] = ()) -> None:
        """Book the blocks ``num_rows`` more rows of ``cache`` need, and the hit blocks ``cached`` it takes back."""
        pool = self._track(cache)
        if pool is not None:
            self.free[id(pool)] -= cast("PagedKVCache", cache).blocks_needed(num_rows)
            if cached:
                self.free[id(pool)] -= self._unheld(pool, cached)
                self._refs[id(pool)].update(cached)

    def book(self, cache: BaseKVCache, num_rows: int) -> bool:
        """``take`` the blocks ``num_rows`` more rows of ``cache`` need if they fit (``fits``, counted once);
        False, and nothing taken, if they do not."""
        pool = self._track(cache)
        if pool is None:
            return True
        needed = cast("PagedKVCache", cache).blocks_needed(num_rows)
        if needed > self.free[id(pool)] and not pool.growable:
            return False
        self.free[id(pool)] -= needed
        return True

    def unbook(self, cache: BaseKVCache, num_rows: int) -> None:
        """Undo a ``book`` of ``num_rows`` rows (its request was preempted after all)."""
        pool = self._track(cache)
        if pool is not None:
            self.free[id(pool)] += cast("PagedKVCache", cache).blocks_needed(num_rows)

    def give_back(self, cache: BaseKVCache) -> None:
        """Book ``cache``'s references as dropped (a preemption): its blocks nobody else holds are free again."""
        pool = self._track(cache)
        if pool is not None:
            refs = self._refs[id(pool)]
            for block in cast("PagedKVCache", cache).block_table:
                refs[block] -= 1
                if pool.ref_counts[block] + refs[block] == 0:
                    self.free[id(pool)] += 1

    def _track(self, cache: BaseKVCache) -> BlockPool | None:
        pool = cache.shared_pool
        if pool is not None and id(pool) not in self.pools:  # its free blocks are counted once, at its first cache
            self.pools[id(pool)], self.free[id(pool)], self._refs[id(pool)] = pool, pool.num_free_blocks, Counter()
        return pool

    def _unheld(self, pool: BlockPool, cached: Sequence[int]) -> int:
        """Blocks of a hit that no table would hold: taking them back uses that many free blocks."""
        refs = self._refs[id(pool)]
        return sum(pool.ref_counts[b] + refs[b] == 0 for b in set(cached))


def check_pool_capacity(
    rows: Sequence[tuple[BaseKVCache, int]], what: str = "this append", released: Sequence[BaseKVCache] = (),
    adopted: Sequence[tuple[BaseKVCache, Sequence[int]]] = (),
) -> None:
    """Raise MemoryError if the shared pools cannot take ``num_rows`` more rows for each ``(cache, num_rows)``.

    ``released`` caches give their blocks back first (a step's preempted requests); ``adopted`` lists
    the cached blocks prefix-cache hits take back, as ``(cache, block_ids)``. The planner's ledger
    counts it all.
    """
    ledger = BlockLedger()
    for cache in released:
        ledger.give_back(cache)
    for cache, blocks in adopted:
        ledger.take(cache, 0, blocks)
    room = dict(ledger.free)  # before the rows; a pool first seen below has its own free blocks
    per_cache: dict[int, tuple[BaseKVCache, int]] = {}  # a cache may appear twice: its rows are booked together
    for cache, num_rows in rows:
        per_cache[id(cache)] = (cache, per_cache.get(id(cache), (cache, 0))[1] + num_rows)
    for cache, num_rows in per_cache.values():
        ledger.take(cache, num_rows)
    for key, free in ledger.free.items():
        pool = ledger.pools[key]
        if free < 0 and not pool.growable:
            had = room.get(key, pool.num_free_blocks)
            raise CBLabMemoryError(
                f"{what} needs {had - free} new KV blocks but the shared pool has {had} free of "
                f"{pool.num_blocks}; give the BlockPool more num_blocks or run fewer requests at once"
            )
