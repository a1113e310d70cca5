"""Puts ``tests/`` on ``sys.path`` so test modules can ``from helpers import make_request, assert_oracle``
(also under ``--import-mode=importlib``, which adds nothing to ``sys.path``)."""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)
