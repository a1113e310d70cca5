"""``GET /metrics``: the server's state in Prometheus text, through ``prometheus_client``.

The names are vLLM's under a ``cb_lab:`` prefix, so a Grafana board built for vLLM reads them
after a rename of the prefix: gauges sampled at scrape time (running, waiting, KV usage),
counters and histograms updated by the engine thread after every step. The process's own figures
come too, as ``prometheus_client`` names them (``process_resident_memory_bytes``, CPU seconds, open
files), so a long run's memory can be watched from outside.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from cb_lab.async_engine import AsyncLLMEngine
from cb_lab.engine import LLMEngine
from cb_lab.outputs import RequestOutput

__all__ = ["ServerMetrics"]

# vLLM's buckets for request latencies (seconds), trimmed to a CPU's range.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class ServerMetrics:
    """One registry per server (tests start several servers in one process)."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series beside every counter (process-wide, as vLLM does)
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_*: RSS, CPU seconds, open files (Linux)
        self.running = Gauge("cb_lab:num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("cb_lab:num_requests_waiting", "Requests queued, not running yet.", registry=r)
        self.kv_usage = Gauge("cb_lab:kv_cache_usage_perc", "Share of KV blocks in use (1 = full).", registry=r)
        self.prompt_tokens = Counter("cb_lab:prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("cb_lab:generation_tokens", "Tokens generated.", registry=r)
        self.success = Counter("cb_lab:request_success", "Finished requests, by their first sample's finish reason.",
                               ["finished_reason"], registry=r)
        self.ttft = Histogram("cb_lab:time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("cb_lab:time_per_output_token_seconds", "Time between two tokens of a request.",
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("cb_lab:e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self._seen: dict[str, int] = {}  # tokens already counted, per unfinished request

    def bind(self, engine: AsyncLLMEngine) -> None:
        """Sample the gauges from ``engine`` at scrape time."""
        pool = engine.engine.pool
        self.running.set_function(lambda: engine.num_running)
        self.waiting.set_function(lambda: engine.num_waiting)
        self.kv_usage.set_function(lambda: (pool.num_blocks - pool.num_free_blocks) / pool.num_blocks)

    def on_step(self, engine: LLMEngine, outputs: list[RequestOutput]) -> None:
        """Count the step's new tokens and the requests it finished (the engine thread calls this)."""
        for out in outputs:
            tokens = sum(len(c.token_ids) for c in out.outputs)
            self.generation_tokens.inc(tokens - self._seen.get(out.request_id, 0))
            self._seen[out.request_id] = tokens
            if out.finished:
                del self._seen[out.request_id]
                self._finished(out)
        for request_id in [i for i in self._seen if i not in engine.outputs]:
            del self._seen[request_id]  # aborted: it reports no more (its tokens stay counted)

    def _finished(self, out: RequestOutput) -> None:
        """One request (its ``n`` samples together), as the latency histograms count it too."""
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.success.labels(finished_reason=out.outputs[0].finish_reason or "abort").inc()
        times = out.token_times
        if times:
            self.ttft.observe(times[0])
            self.e2e.observe(times[-1])
            for before, after in zip(times, times[1:]):
                self.tpot.observe(after - before)

    def render(self) -> bytes:
        return generate_latest(self.registry)
