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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

os.environ.setdefault("CB_LAB_CHECK_INVARIANTS", "1")
os.environ.setdefault("CB_LAB_CACHE", str(Path(__file__).resolve().parent.parent / ".cache"))
settings.register_profile("default", deadline=None)
settings.register_profile("long", deadline=None, max_examples=1000, stateful_step_count=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium under Playwright, one per test module; never a downloaded browser. Skips
    without ``/usr/bin/chromium`` (``apt-get install -y chromium``; ``make test`` installs it where it
    can) or without Playwright."""
    if not CHROMIUM.exists():
        pytest.skip("the live page's browser tests need Debian's Chromium at /usr/bin/chromium: apt-get install -y "
                    "chromium (make test installs it when it runs as root with apt-get)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (it is in requirements.txt)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM))
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[tuple[Any, list[str]]]:
    """A fresh page and the console errors it logs (uncaught exceptions included)."""
    errors: list[str] = []
    p = browser.new_page(viewport={"width": 1400, "height": 900})
    p.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    p.on("pageerror", lambda e: errors.append(str(e)))
    yield p, errors
    p.close()
