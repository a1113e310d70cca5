"""Test setup: ``tests/`` on ``sys.path`` (so ``from helpers import make_request, assert_oracle``
works, also under ``--import-mode=importlib``), the scheduler's debug mode on, hypothesis profiles.

- ``CB_LAB_CHECK_INVARIANTS=1``: every ``Scheduler`` checks ``cb_lab/core/invariants.py`` after
  every step (set ``CB_LAB_CHECK_INVARIANTS=0`` to run the suite without it).
- ``HYPOTHESIS_PROFILE=long``: ten times the examples, for an occasional deep run.
- ``CB_LAB_CACHE``: converted GGUF models go to the repository's ``.cache/`` (git-ignored), wherever a
  test runs, so the real model is converted once, not once per test directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import settings

os.environ.setdefault("CB_LAB_CHECK_INVARIANTS", "1")
os.environ.setdefault("CB_LAB_CACHE", str(Path(__file__).resolve().parent.parent / ".cache"))
settings.register_profile("default", deadline=None)
settings.register_profile("long", deadline=None, max_examples=1000, stateful_step_count=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)
