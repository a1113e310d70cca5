"""Phase 13 (docs/learning_materials/phase13_prefix_caching.md): your answers.

Check: make check PHASE=13
"""

from __future__ import annotations

# 1. Block size 4. a (prompt p, 14 rows) has run; then b = p[:10] + 3 rows of its own, c = p again, d = p[:12]
#    arrive together. The prefill rows each takes from the cache: {"b": ..., "c": ..., "d": ...}.
HIT_ROWS: dict[str, int] | None = None

# 2. SamplingParams(n=3) of a 10-row prompt, block size 4: prefill rows computed in all, copy-on-write copies;
#    and the copies for a 9-row prompt.
PREFILL_ROWS_N3: int | None = None
COPIES_N3: int | None = None
COPIES_N3_9_ROWS: int | None = None

# 3. A pool of 6 blocks of 4 rows: a (8 rows) runs, then b (8 other rows), then c (16 rows of its own).
#    Whose cached blocks did c evict ("a" or "b")? Then a and b arrive again together: rows each takes from the cache.
EVICTED_FIRST: str | None = None
HIT_ROWS_A_AGAIN: int | None = None
HIT_ROWS_B_AGAIN: int | None = None

# 4. The prefill tokens `python -m demos.demo_prefix_caching --quick --system-len 16` saves.
SAVED_SYSTEM_LEN_16: int | None = None
