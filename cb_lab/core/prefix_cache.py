"""Prefix caching: a new request skips the prefill of every full block another request already has.

Chat and agent traffic repeats the same system prompt across requests. A full KV block is
named by a hash of its rows *and of every row before it* (the previous block's hash chains
in), so equal hashes mean equal K/V: the keys and values of a position depend on that position
and the ones before it, nothing else::

    prompt  [s0 s1 s2 s3 | s4 s5 s6 s7 | u0 u1]        block size 4
    hashes    h0 = H(-, s0..s3)   h1 = H(h0, s4..s7)    (u0 u1: not a full block, never cached)

Only full blocks are cached: a partial block would still be written into by its request, and
its hash would change with every row. On admission a request takes the longest chain of cached
blocks of its prefill rows (``block_pool.block_hashes``, ``BlockPool.lookup``), but never its last row: at least one row
is computed, so its first token comes from its own forward. Rows are token ids for a token
model and the rows' bytes for TinyLLM's vector tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import shared_paged
from cb_lab.core.plan import PrefillChunk, StepPlan
from cb_lab.core.request import Request

__all__ = ["block_size_of", "pool_counters", "prefix_hit", "prefix_stats", "register_full_blocks", "step_pools"]


def prefix_hit(req: Request) -> tuple[int, ...]:
    """The cached blocks a waiting request can start from: the longest chain, leaving >= 1 row to compute."""
    cache = shared_paged(req.kv_cache)
    if cache is None or cache.pool is None:
        return ()
    hashes = req.block_hashes(cache.block_size)
    usable = (req.prefill_len - 1) // cache.block_size  # never the block that holds the last prefill row
    if req.prompt_logprob_positions(0, req.prefill_len):  # rows whose prompt logprobs are to come must run
        usable = min(usable, req.num_prompt_logprobs // cache.block_size)
    return tuple(cache.pool.lookup(hashes[:usable]))


def register_full_blocks(chunks: Sequence[PrefillChunk]) -> None:
    """After a step's rows are stored: cache every block its prefill chunks have just filled."""
    for chunk in chunks:
        cache = shared_paged(chunk.request.kv_cache)
        if cache is None or cache.pool is None:
            continue
        hashes = chunk.request.block_hashes(cache.block_size)
        for j in range(chunk.start // cache.block_size, min(chunk.end // cache.block_size, len(hashes))):
            cache.pool.cache_block(cache.block_table[j], hashes[j])


def prefix_stats(plan: StepPlan) -> dict[str, int]:
    """A step's hits: prefill rows and blocks its admissions took from the cache, out of their prefills'."""
    admitted = [c for c in plan.prefill if c.request in plan.admitted]
    return {
        "prefix_hit_tokens": sum(c.start for c in admitted if c.cached_blocks),
        "prefix_hit_blocks": sum(len(c.cached_blocks) for c in admitted),
        "admitted_prompt_tokens": sum(c.request.prefill_len for c in admitted),
        "admitted_prompt_blocks": sum(_full_blocks(c.request) for c in admitted),
    }


def block_size_of(req: Request) -> int:
    """The block size of a request's shared pool (0: no shared pool, nothing to share)."""
    cache = shared_paged(req.kv_cache)
    return 0 if cache is None else cache.block_size


def _full_blocks(req: Request) -> int:
    size = block_size_of(req)
    return req.prefill_len // size if size else 0


def step_pools(plan: StepPlan) -> list[BlockPool]:
    """The shared pools of a step's requests, each once."""
    shared = (r.kv_cache.shared_pool for r in plan.requests)
    return list({id(pool): pool for pool in shared if pool is not None}.values())


def pool_counters(pools: Sequence[BlockPool]) -> tuple[int, int]:
    """Evictions and copy-on-write copies so far in ``pools`` (a commit takes the difference)."""
    return sum(p.num_evictions for p in pools), sum(p.num_copies for p in pools)
