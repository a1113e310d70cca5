"""KV caches: where a request keeps the keys and values of every token it has seen.

Attention at position ``t`` needs the keys and values of positions ``0..t``. Recomputing
them every step would make generation quadratic, so each request caches them and
only ever *appends* (one row per token, ``[T, D]`` for keys and for values).

Two layouts, one interface (:class:`BaseKVCache`):

- :class:`DenseKVCache`: one contiguous buffer per tensor that doubles when full,
  so an append costs amortized O(new rows). Simplest to inspect.
- :class:`PagedKVCache`: fixed-size blocks handed out by a tiny allocator and found
  through a *block table* (vLLM's PagedAttention layout). Memory grows one block at a
  time and nothing needs to be contiguous.

Appends are validated here, once, at the boundary: malformed tensors raise
``ValidationError``; well-formed rows that do not fit this cache (dim, device) raise
``KVCacheError``; a bad ``block_size`` / ``initial_capacity`` raises ``ConfigurationError``.
Cache plugins (``hooks``) run around every append.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

import torch

from cb_lab.exceptions import ConfigurationError, KVCacheError, ValidationError

logger = logging.getLogger(__name__)

__all__ = ["BaseKVCache", "BlockAllocator", "CacheHook", "DenseKVCache", "PagedKVCache", "same_device"]


class CacheHook(Protocol):
    """What a cache calls around an append (``cb_lab.plugins.base.CachePlugin`` fits it)."""

    def before_append(
        self, cache: BaseKVCache, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def after_append(self, cache: BaseKVCache, num_rows: int) -> None: ...


def same_device(a: torch.device, b: torch.device) -> bool:
    # torch.device("cuda") and torch.device("cuda:0") name the same place.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _check_rows(k_new: object, v_new: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(k_new, torch.Tensor) or not isinstance(v_new, torch.Tensor):
        raise ValidationError(
            f"K/V rows must be torch.Tensor, got {type(k_new).__name__} and {type(v_new).__name__}"
        )
    if k_new.dim() != 2 or k_new.shape != v_new.shape:
        raise ValidationError(
            f"K and V must both be [rows, dim] with equal shapes, got {tuple(k_new.shape)} "
            f"and {tuple(v_new.shape)}"
        )
    if k_new.shape[0] == 0:
        raise ValidationError("append at least one K/V row, got 0 rows")
    if not (k_new.is_floating_point() and v_new.is_floating_point()):
        raise ValidationError(f"K/V must be floating point, got {k_new.dtype} and {v_new.dtype}")
    return k_new, v_new


class BaseKVCache(ABC):
    """Append-only storage of one request's keys and values, ``[len, dim]`` each.

    ``append`` validates, runs the cache hooks, then stores; subclasses implement
    only ``_store``, ``get_kv`` and ``__len__``. ``dim`` and ``dtype`` are fixed by the
    first append (after hooks, so a compression hook chooses the storage dtype).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dim: int | None = None
        # Set by the Scheduler to its PluginManager's cache plugins (a live list).
        self.hooks: Sequence[CacheHook] = ()

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Append rows ``k_new, v_new`` (``[n, dim]`` each) after the stored ones."""
        k_new, v_new = _check_rows(k_new, v_new)
        if self.dim is not None and k_new.shape[1] != self.dim:
            raise KVCacheError(
                f"K/V rows have dim {k_new.shape[1]} but this cache holds dim {self.dim}; "
                "use one cache per request and one model dim"
            )
        if not same_device(k_new.device, self.device) or not same_device(v_new.device, self.device):
            raise KVCacheError(
                f"K/V rows are on {k_new.device}/{v_new.device} but the cache is on {self.device}; "
                "create the cache on the model's device"
            )
        for hook in self.hooks:
            k_new, v_new = hook.before_append(self, k_new, v_new)
        self._store(k_new, v_new)
        self.dim = k_new.shape[1]
        for hook in self.hooks:
            hook.after_append(self, k_new.shape[0])

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
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of the stored rows (not of spare capacity)."""


class DenseKVCache(BaseKVCache):
    """Contiguous K and V buffers that double in capacity when full.

    ``get_kv()`` returns *views* of the buffers, not copies: do not write into them.
    They stay valid after later appends (rows are never rewritten; growing copies into
    a new buffer and leaves the old one to the views that still point at it).
    """

    def __init__(self, device: torch.device | str | None = None, initial_capacity: int = 16) -> None:
        super().__init__(device)
        if isinstance(initial_capacity, bool) or not isinstance(initial_capacity, int) or initial_capacity < 1:
            raise ConfigurationError(f"initial_capacity must be an int >= 1, got {initial_capacity!r}")
        self.initial_capacity = initial_capacity
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


class BlockAllocator:
    """A tiny block allocator: ``num_blocks`` fixed-size blocks in two tensors and a free list.

    ``key_blocks`` / ``value_blocks`` are ``[num_blocks, block_size, D]``; a block id is an
    index into their first axis. When no block is free the pool doubles (block ids stay
    valid), so an allocation costs amortized O(block).
    """

    def __init__(
        self, block_size: int, dim: int, dtype: torch.dtype, device: torch.device, num_blocks: int = 4
    ) -> None:
        self.block_size = block_size
        self.key_blocks = torch.zeros((num_blocks, block_size, dim), dtype=dtype, device=device)
        self.value_blocks = torch.zeros_like(self.key_blocks)
        self.free_block_ids: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives the lowest id

    @property
    def num_blocks(self) -> int:
        return self.key_blocks.shape[0]

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def allocate(self) -> int:
        """Hand out one free block id, growing the pool when none is free."""
        if not self.free_block_ids:
            old = self.num_blocks
            self.key_blocks = torch.cat([self.key_blocks, torch.zeros_like(self.key_blocks)])
            self.value_blocks = torch.cat([self.value_blocks, torch.zeros_like(self.value_blocks)])
            self.free_block_ids = list(range(2 * old - 1, old - 1, -1))
            logger.debug("block pool grew from %d to %d blocks", old, 2 * old)
        return self.free_block_ids.pop()


class PagedKVCache(BaseKVCache):
    """K/V stored in fixed-size blocks, found through ``block_table`` (vLLM's layout).

    Token position ``p`` lives in block ``block_table[p // block_size]`` at slot
    ``p % block_size``. Only the last block can be partly filled, so at most
    ``block_size - 1`` slots are ever wasted. ``get_kv()`` gathers the blocks into new
    ``[len, D]`` tensors (a copy); the decode path avoids it with paged attention.
    """

    def __init__(self, block_size: int = 64, device: torch.device | str | None = None) -> None:
        super().__init__(device)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ConfigurationError(f"block_size must be an int >= 1, got {block_size!r}")
        self.block_size = block_size
        self.allocator: BlockAllocator | None = None  # created by the first append (dim known)
        self.block_table: list[int] = []
        self._len = 0

    def _store(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        if self.allocator is None:
            self.allocator = BlockAllocator(self.block_size, k_new.shape[1], k_new.dtype, self.device)
        n, end = k_new.shape[0], self._len + k_new.shape[0]
        while len(self.block_table) * self.block_size < end:
            self.block_table.append(self.allocator.allocate())
        # Scatter the rows to their (block, slot) addresses in one indexed write.
        positions = torch.arange(self._len, end, device=self.device)
        table = torch.tensor(self.block_table, device=self.device)
        blocks, slots = table[positions // self.block_size], positions % self.block_size
        self.allocator.key_blocks[blocks, slots] = k_new.to(self.allocator.key_blocks.dtype)
        self.allocator.value_blocks[blocks, slots] = v_new.to(self.allocator.value_blocks.dtype)
        self._len += n

    def get_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.allocator is None:
            empty = torch.empty((0, self.dim or 0), device=self.device)
            return empty, empty
        table = torch.tensor(self.block_table, device=self.device)
        k = self.allocator.key_blocks[table].flatten(0, 1)[: self._len]  # [len, D]
        v = self.allocator.value_blocks[table].flatten(0, 1)[: self._len]
        return k, v

    def __len__(self) -> int:
        return self._len

    @property
    def nbytes(self) -> int:
        if self.allocator is None:
            return 0
        return 2 * self._len * self.allocator.key_blocks.shape[2] * self.allocator.key_blocks.element_size()

    @property
    def num_blocks_used(self) -> int:
        return len(self.block_table)

    @property
    def num_blocks_free(self) -> int:
        return 0 if self.allocator is None else self.allocator.num_free_blocks

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(len={self._len}, block_size={self.block_size}, "
            f"block_table={self.block_table}, free_blocks={self.num_blocks_free})"
        )
