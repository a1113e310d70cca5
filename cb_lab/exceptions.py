"""The cb-lab exception hierarchy.

Every error the library raises on purpose is a ``CBLabException``, so a caller can
catch the library's errors in one place. Validation happens once, at the public
boundary (constructors, ``Scheduler.add_request``, ``BaseKVCache.append``); the
message names the bad value and says how to fix it.

``MemoryError`` here shadows the builtin of the same name inside this module only;
import it under another name if you also need the builtin:
``from cb_lab.exceptions import MemoryError as CBLabMemoryError``.
"""

from __future__ import annotations

__all__ = [
    "CBLabException",
    "ValidationError",
    "RequestError",
    "SchedulerError",
    "KVCacheError",
    "ModelError",
    "ConfigurationError",
    "MemoryError",
]


class CBLabException(Exception):
    """Base class of every error cb-lab raises on purpose."""


class ValidationError(CBLabException, ValueError):
    """An argument is malformed in itself: wrong type, rank, shape, dtype, or a NaN."""


class RequestError(CBLabException):
    """A request was asked to do something its state does not allow (e.g. grow after finishing)."""


class SchedulerError(CBLabException):
    """The scheduler cannot take a request (duplicate id, wrong dim, cache already used, ...)."""


class KVCacheError(CBLabException):
    """K/V rows do not fit the cache they are appended to (dim, device)."""


class ModelError(CBLabException):
    """The model was called with inputs it cannot process (wrong dim, mask shape)."""


class ConfigurationError(CBLabException, ValueError):
    """A configuration value (budget, chunk size, block size, plugin option) is invalid."""


class MemoryError(CBLabException):  # noqa: A001 - the spec's name; shadows the builtin only here
    """Memory ran out or cannot be measured: a shared KV block pool has too few free blocks,
    or a memory delta was asked for before its baseline was set."""
