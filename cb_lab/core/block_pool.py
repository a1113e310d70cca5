"""The KV block pool: fixed-size blocks of K/V storage, handed out by id (vLLM's BlockPool).

One K tensor and one V tensor hold every block: ``[num_blocks, block_size, D]``. A request's
cache owns a *block table* (a list of block ids); position ``p`` of that request lives at
``(block_table[p // block_size], p % block_size)``, a flat *slot* ``block_id * block_size + offset``.

::

    key_cache  [num_blocks, block_size, D]      free_block_ids  [5, 6, 7]
    block 0  a0 a1 a2 a3   <- request a: block_table [0, 3]
    block 1  b0 b1 b2 b3   <- request b: block_table [1, 2, 4]
    ...

Every block has a reference count: the number of block tables holding it. ``free`` lowers
it and a block returns to the free list at 0 (later, prefix caching shares blocks between
requests through the same counts). A pool shared by many requests has a fixed size and
raises ``MemoryError`` (cb-lab's) when it runs out; a request's private pool may grow.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import torch

from cb_lab.exceptions import ConfigurationError, ValidationError
from cb_lab.exceptions import MemoryError as CBLabMemoryError

logger = logging.getLogger(__name__)

__all__ = ["BlockPool"]


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(f"{name} must be an int >= 0, got {value!r}")
    return value


class BlockPool:
    """``num_blocks`` KV blocks of ``block_size`` slots for ``dim``-wide rows, a free list and ref counts.

    ``growable=True`` doubles the pool instead of failing when it runs out (block ids stay
    valid); that is how a ``PagedKVCache`` without a shared pool gets its private one.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        growable: bool = False,
    ) -> None:
        _positive("num_blocks", num_blocks)
        self.block_size = _positive("block_size", block_size)
        self.dim = _positive("dim", dim)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.growable = growable
        self.key_cache = torch.zeros((num_blocks, block_size, dim), dtype=dtype, device=self.device)
        self.value_cache = torch.zeros_like(self.key_cache)
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out the lowest id
        self.num_tokens = 0  # rows stored by the caches using this pool (they keep it up to date)

    @property
    def num_blocks(self) -> int:
        return self.key_cache.shape[0]

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_unused_slots(self) -> int:
        """Slots in used blocks that hold no row: the paged layout's only waste."""
        return self.num_used_blocks * self.block_size - self.num_tokens

    def can_allocate(self, num_blocks: int) -> bool:
        return self.growable or _count("num_blocks", num_blocks) <= self.num_free_blocks

    def allocate(self, num_blocks: int = 1) -> list[int]:
        """Take ``num_blocks`` free blocks (ref count 1 each); raises MemoryError when there are too few."""
        if _count("num_blocks", num_blocks) > self.num_free_blocks:
            if not self.growable:
                raise CBLabMemoryError(
                    f"KV block pool exhausted: {num_blocks} block(s) needed, {self.num_free_blocks} free of "
                    f"{self.num_blocks}; create the BlockPool with more num_blocks or run fewer requests at once"
                )
            self._grow(max(self.num_blocks, num_blocks))
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
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)

    def _grow(self, extra: int) -> None:
        old = self.num_blocks
        self.key_cache = torch.cat([self.key_cache, self.key_cache.new_zeros((extra, *self.key_cache.shape[1:]))])
        self.value_cache = torch.cat(
            [self.value_cache, self.value_cache.new_zeros((extra, *self.value_cache.shape[1:]))]
        )
        self.ref_counts.extend([0] * extra)
        self.free_block_ids = list(range(old + extra - 1, old - 1, -1)) + self.free_block_ids
        logger.debug("block pool grew from %d to %d blocks", old, old + extra)

    def write(self, slots: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor) -> None:
        """Scatter rows ``[n, D]`` to flat slots ``[n]`` (``block_id * block_size + offset``) in one op each."""
        self.key_cache.view(-1, self.dim)[slots] = k_rows.to(self.key_cache.dtype)
        self.value_cache.view(-1, self.dim)[slots] = v_rows.to(self.value_cache.dtype)

    def stats(self) -> dict[str, int]:
        return {
            "num_blocks": self.num_blocks,
            "used_blocks": self.num_used_blocks,
            "free_blocks": self.num_free_blocks,
            "tokens_stored": self.num_tokens,
            "unused_slots": self.num_unused_slots,
        }

    def __repr__(self) -> str:
        return (
            f"BlockPool(blocks={self.num_used_blocks}/{self.num_blocks} used, block_size={self.block_size}, "
            f"dim={self.dim}, tokens={self.num_tokens})"
        )
