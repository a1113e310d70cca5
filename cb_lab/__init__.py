"""cb-lab: continuous batching, rebuilt small, correct and fast enough to experiment with.

The pieces, bottom to top (imports point down only):

- ``cb_lab.core.request`` / ``kv_cache`` / ``batch_builder``: the data
- ``cb_lab.attention``: dense, ragged (masked) and paged attention
- ``cb_lab.model.tiny_llm``: a one-layer, one-head attention model over vector tokens
- ``cb_lab.core.scheduler`` (+ ``executor``): the token-budget loop, plan / compute / commit
- ``cb_lab.plugins`` and ``cb_lab.monitoring``: observe the scheduler through hooks

The library logs through :mod:`logging` and never prints; attach a handler to the
``cb_lab`` logger to see its messages.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

# Last, the notebook views: each registers itself for the type it draws (cb_lab/core/view_registry.py).
import cb_lab.display  # noqa: E402, F401
