"""Plugins: code that watches (or shapes) a run through hooks the library really calls.

Three kinds, each called from one place:

- ``SchedulerPlugin``: ``on_request_added(request, step_id)`` (from ``Scheduler.add_request``),
  ``before_step(plan)``, ``after_step(stats)`` and ``on_request_completion(request)``
  (from ``Scheduler.step`` and its commit);
- ``AttentionPlugin``: ``on_attention(phase, weights)`` (from TinyLLM's attention);
- ``CachePlugin``: ``before_append(cache, k, v) -> (k, v)`` and
  ``after_append(cache, num_rows, nbytes)`` (from ``BaseKVCache.append`` / ``append_batch`` and a
  step's commit).

Give the manager to ``Scheduler(model, plugins=manager)``; it wires all three kinds.
Hooks run in registration order, and an exception from a hook propagates (nothing
swallows it). Where a hook runs decides what a fault in it leaves behind:
``on_request_added``, ``before_step``, attention hooks and ``before_append`` run before
anything of theirs is written (the request is not queued; the step changes nothing and can
be retried); ``after_append``, ``on_request_completion`` and ``after_step`` are observers that
run once the step has committed (it stays committed).

This module imports no scheduler at run time: the hook signatures name the scheduler's
types for the type checker only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from cb_lab.exceptions import ConfigurationError, ValidationError

if TYPE_CHECKING:
    from cb_lab.core.kv_cache import BaseKVCache
    from cb_lab.core.plan import StepPlan
    from cb_lab.core.request import Request

__all__ = ["AttentionPlugin", "CachePlugin", "Plugin", "PluginManager", "SchedulerPlugin"]


class Plugin:
    """Base of every plugin: a name (the class name) and its configuration.

    A plugin lists its option names in ``options`` and keeps each as an attribute of
    the same name; it overrides ``configure`` to validate and apply the ones given.
    """

    options: ClassVar[tuple[str, ...]] = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def get_config(self) -> dict[str, Any]:
        return {option: getattr(self, option) for option in self.options}

    def configure(self, config: Mapping[str, Any]) -> None:
        """Apply the options in ``config`` (others keep their values); rejects unknown names."""
        unknown = sorted(set(config) - set(self.options))
        if unknown:
            raise ConfigurationError(f"{self.name} has no option(s) {unknown}; its options are {list(self.options)}")


class SchedulerPlugin(Plugin):
    """Observes scheduler steps. Override the hooks you need; the defaults do nothing."""

    def on_request_added(self, request: Request, step_id: int) -> None:
        """Called when a request joins the waiting queue, before step ``step_id`` runs."""

    def before_step(self, plan: StepPlan) -> None:
        """Called with the step's plan, before anything is computed or written."""

    def after_step(self, stats: dict[str, Any]) -> None:
        """Called with the step's stats dict, after the step has been committed."""

    def on_request_completion(self, request: Request) -> None:
        """Called once per request, in the step that finishes it."""

    def on_request_aborted(self, request: Request) -> None:
        """Called when ``Scheduler.abort`` removed ``request`` (between steps; its blocks are freed)."""


class AttentionPlugin(Plugin):
    """Sees attention probabilities: ``weights [rows, keys]`` (masked keys are exactly 0)."""

    def on_attention(self, phase: str, weights: torch.Tensor) -> None:
        """``phase`` is ``"prefill"`` (one ragged batch) or ``"decode"`` (one token)."""


class CachePlugin(Plugin):
    """Runs around every KV-cache append; ``before_append`` may replace the rows stored."""

    def before_append(
        self, cache: BaseKVCache, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return k_new, v_new

    def after_append(self, cache: BaseKVCache, num_rows: int, nbytes: int) -> None:
        """Called once ``num_rows`` rows are stored; ``nbytes``: the bytes they take in the cache.

        In a step it runs after the commit, when a finished request's shared-pool cache may
        already be empty again: use ``nbytes``, not the cache's contents.
        """


class PluginManager:
    """Registry of plugins by kind; the scheduler, model and caches call them through it."""

    def __init__(self) -> None:
        self.scheduler_plugins: list[SchedulerPlugin] = []
        self.attention_plugins: list[AttentionPlugin] = []
        self.cache_plugins: list[CachePlugin] = []

    def _register(self, plugin: Plugin, kind: type[Plugin], config: Mapping[str, Any] | None) -> None:
        if not isinstance(plugin, kind):
            raise ValidationError(f"{type(plugin).__name__} is not a {kind.__name__}; register it under its own kind")
        if plugin.name in self._all():
            raise ConfigurationError(f"a plugin named {plugin.name!r} is already registered")
        if config:
            plugin.configure(config)

    def register_scheduler_plugin(self, plugin: SchedulerPlugin, config: Mapping[str, Any] | None = None) -> None:
        self._register(plugin, SchedulerPlugin, config)
        self.scheduler_plugins.append(plugin)

    def register_attention_plugin(self, plugin: AttentionPlugin, config: Mapping[str, Any] | None = None) -> None:
        self._register(plugin, AttentionPlugin, config)
        self.attention_plugins.append(plugin)

    def register_cache_plugin(self, plugin: CachePlugin, config: Mapping[str, Any] | None = None) -> None:
        self._register(plugin, CachePlugin, config)
        self.cache_plugins.append(plugin)

    def _all(self) -> dict[str, Plugin]:
        plugins: list[Plugin] = [*self.scheduler_plugins, *self.attention_plugins, *self.cache_plugins]
        return {p.name: p for p in plugins}

    def _get(self, plugin_name: str) -> Plugin:
        plugins = self._all()
        if plugin_name not in plugins:
            raise ConfigurationError(f"no plugin named {plugin_name!r}; registered: {sorted(plugins)}")
        return plugins[plugin_name]

    def get_plugin_config(self, plugin_name: str) -> dict[str, Any]:
        return self._get(plugin_name).get_config()

    def set_plugin_config(self, plugin_name: str, config: Mapping[str, Any]) -> None:
        """Validate and apply ``config`` to the named plugin (it takes effect at once)."""
        self._get(plugin_name).configure(config)

    def list_plugins(self) -> dict[str, list[str]]:
        return {
            "scheduler": [p.name for p in self.scheduler_plugins],
            "attention": [p.name for p in self.attention_plugins],
            "cache": [p.name for p in self.cache_plugins],
        }

    # Fan-out used by the Scheduler.
    def on_request_added(self, request: Request, step_id: int) -> None:
        for plugin in self.scheduler_plugins:
            plugin.on_request_added(request, step_id)

    def before_step(self, plan: StepPlan) -> None:
        for plugin in self.scheduler_plugins:
            plugin.before_step(plan)

    def after_step(self, stats: dict[str, Any]) -> None:
        for plugin in self.scheduler_plugins:
            plugin.after_step(stats)

    def on_request_completion(self, request: Request) -> None:
        for plugin in self.scheduler_plugins:
            plugin.on_request_completion(request)

    def on_request_aborted(self, request: Request) -> None:
        for plugin in self.scheduler_plugins:
            plugin.on_request_aborted(request)
