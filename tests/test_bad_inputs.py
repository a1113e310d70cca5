"""Every public boundary refuses bad input with the spec's exception and a message naming the value.

One table: ``(id, call, exception class, text the message must contain)``, over every public
entry point: requests, caches, the batch builder, scheduler config, ``add_request``, the model,
plugins, metrics, workload files and the serving config; then command-line arguments (usage
errors, exit status 2). Each ``call`` builds what it needs and then makes exactly one bad call,
beside a scheduler with requests in flight, which then finishes them all oracle-exact. Below
the table: a running scheduler hit by every bad ``add_request`` is not disturbed at all.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_oracle, make_model, make_request

from cb_lab import __main__ as main_job
from cb_lab import bench
from cb_lab.core.batch_builder import build_ragged_batch
from cb_lab.core.kv_cache import DenseKVCache, PagedKVCache
from cb_lab.core.request import Request
from cb_lab.core.scheduler import Scheduler
from cb_lab.exceptions import (
    CBLabException,
    ConfigurationError,
    KVCacheError,
    ModelError,
    RequestError,
    SchedulerError,
    ValidationError,
)
from cb_lab.model.llama import LlamaModel
from cb_lab.model.llama_config import LlamaConfig
from cb_lab.model.llama_step import LlamaStepModel
from cb_lab.model.tiny_llm import TinyLLM
from cb_lab.monitoring.metrics import MetricsCollector
from cb_lab.plugins.base import AttentionPlugin, CachePlugin, PluginManager, SchedulerPlugin
from cb_lab.sampling import SamplingParams
from cb_lab.serving import ServingConfig, make_config, simulate
from cb_lab.workload import LengthDist, WorkloadConfig
from cb_lab.workload_io import RequestSpec, load_workload, save_workload

DIM = 4


def prompt(L: int = 3, dim: int = DIM) -> torch.Tensor:
    return torch.randn(L, dim, generator=torch.Generator().manual_seed(L * 31 + dim))


def nan_prompt() -> torch.Tensor:
    p = prompt()
    p[1, 2] = float("nan")
    return p


def inf_prompt() -> torch.Tensor:
    p = prompt()
    p[0, 0] = float("-inf")
    return p


def req(req_id: Any = "r", p: Any = None, n: Any = 2, cache: Any = "dense", **kw: Any) -> Request:
    cache = DenseKVCache() if cache == "dense" else cache
    return Request(req_id, prompt() if p is None else p, n, cache, **kw)


def cache_with_rows(cache=None, dim: int = DIM):
    cache = cache if cache is not None else DenseKVCache()
    cache.append(torch.ones(2, dim), torch.ones(2, dim))
    return cache


def scheduler(*active: Request, **kw: Any) -> Scheduler:
    sched = Scheduler(make_model(DIM), **kw)
    for r in active:
        sched.add_request(r)
    return sched


def set_attr(obj: object, name: str, value: object) -> None:
    setattr(obj, name, value)


# ---------------------------------------------------------------- plugins used by the table
class SchedPlugin(SchedulerPlugin):
    pass


class AttnPlugin(AttentionPlugin):
    pass


class LevelPlugin(SchedulerPlugin):
    """A plugin with one option, ``level`` (declared in ``options`` and returned by ``get_config``)."""

    options = ("level",)

    def __init__(self) -> None:
        self.level = "INFO"

    def get_config(self) -> dict[str, Any]:
        return {"level": self.level}

    def configure(self, config) -> None:
        super().configure(config)  # rejects unknown keys
        self.level = config.get("level", self.level)


def manager_with(*plugins: SchedulerPlugin) -> PluginManager:
    m = PluginManager()
    for p in plugins:
        m.register_scheduler_plugin(p)
    return m


# ---------------------------------------------------------------- the table
Case = tuple[str, Callable[[], object], type[CBLabException], str]

REQUEST_CASES: list[Case] = [
    ("request/prompt-1d", lambda: req(p=torch.randn(4)), ValidationError, "(4,)"),
    ("request/prompt-3d", lambda: req(p=torch.randn(1, 3, 4)), ValidationError, "(1, 3, 4)"),
    ("request/prompt-no-rows", lambda: req(p=torch.randn(0, 4)), ValidationError, "(0, 4)"),
    ("request/prompt-no-cols", lambda: req(p=torch.randn(3, 0)), ValidationError, "(3, 0)"),
    ("request/prompt-int", lambda: req(p=torch.ones(3, 4, dtype=torch.int64)), ValidationError, "torch.int64"),
    ("request/prompt-bool", lambda: req(p=torch.ones(3, 4, dtype=torch.bool)), ValidationError, "torch.bool"),
    ("request/prompt-list", lambda: req(p=[[1.0, 2.0]]), ValidationError, "list"),
    ("request/prompt-nan", lambda: req(p=nan_prompt()), ValidationError, "NaN"),
    ("request/prompt-inf", lambda: req(p=inf_prompt()), ValidationError, "inf"),
    ("request/max-new-float", lambda: req(n=1.5), ValidationError, "1.5"),
    ("request/max-new-bool", lambda: req(n=True), ValidationError, "True"),
    ("request/max-new-negative", lambda: req(n=-1), ValidationError, "-1"),
    ("request/max-new-str", lambda: req(n="3"), ValidationError, "'3'"),
    ("request/max-new-none", lambda: req(n=None), ValidationError, "None"),
    ("request/req-id-empty", lambda: req(req_id=""), ValidationError, "''"),
    ("request/req-id-int", lambda: req(req_id=5), ValidationError, "got 5"),
    ("request/req-id-none", lambda: req(req_id=None), ValidationError, "None"),
    ("request/kv-cache-dict", lambda: req(cache={}), ValidationError, "dict"),
    ("request/kv-cache-none", lambda: req(cache=None), ValidationError, "NoneType"),
    ("request/kv-cache-class", lambda: req(cache=DenseKVCache), ValidationError, "ABCMeta"),
    ("request/prefill-pos-negative", lambda: req(prefill_pos=-1), ValidationError, "-1"),
    ("request/prefill-pos-past-end", lambda: req(prefill_pos=4), ValidationError, "got 4"),
    ("request/prefill-pos-bool", lambda: req(prefill_pos=True), ValidationError, "True"),
    ("request/prefill-pos-float", lambda: req(prefill_pos=1.0), ValidationError, "1.0"),
    ("request/append-after-finish", lambda: req(n=0).append_token(torch.zeros(DIM)), RequestError, "'r'"),
    ("request/last-token-before-any", lambda: req().last_token, RequestError, "'r'"),
    ("request/append-token-column", lambda: req().append_token(torch.zeros(DIM, 1)), ValidationError,
     f"({DIM}, 1)"),
    ("request/append-token-int", lambda: req().append_token(torch.zeros(DIM, dtype=torch.int64)), ValidationError,
     "torch.int64"),
]

CACHE_CASES: list[Case] = [
    ("cache/block-size-zero", lambda: PagedKVCache(block_size=0), ConfigurationError, "got 0"),
    ("cache/block-size-float", lambda: PagedKVCache(block_size=2.5), ConfigurationError, "2.5"),
    ("cache/block-size-bool", lambda: PagedKVCache(block_size=True), ConfigurationError, "True"),
    ("cache/initial-capacity-negative", lambda: DenseKVCache(initial_capacity=-1), ConfigurationError, "-1"),
    ("cache/append-1d", lambda: DenseKVCache().append(torch.ones(4), torch.ones(4)), ValidationError, "(4,)"),
    ("cache/append-int", lambda: PagedKVCache(2).append(torch.ones(2, 4, dtype=torch.int32),
                                                        torch.ones(2, 4)), ValidationError, "torch.int32"),
    ("cache/append-zero-rows", lambda: DenseKVCache().append(torch.ones(0, 4), torch.ones(0, 4)),
     ValidationError, "0 rows"),
    ("cache/append-dim-mismatch", lambda: cache_with_rows().append(torch.ones(1, 5), torch.ones(1, 5)),
     KVCacheError, "dim 5"),
    ("cache/append-paged-dim-mismatch", lambda: cache_with_rows(PagedKVCache(3)).append(torch.ones(1, 6),
                                                                                       torch.ones(1, 6)),
     KVCacheError, "dim 6"),
    ("cache/append-meta-device", lambda: DenseKVCache().append(torch.empty(2, 4, device="meta"),
                                                               torch.empty(2, 4, device="meta")),
     KVCacheError, "meta"),
]

BATCH_CASES: list[Case] = [
    ("batch/overlapping-chunks", lambda: build_ragged_batch([("dup", 0, prompt()), ("dup", 2, prompt())]),
     ValidationError, "'dup'"),
    ("batch/negative-start", lambda: build_ragged_batch([("a", -1, prompt())]), ValidationError, "-1"),
    ("batch/mixed-dims", lambda: build_ragged_batch([("a", 0, prompt(2, 3)), ("b", 0, prompt(2, 5))]),
     ValidationError, "[3, 5]"),
]

SCHEDULER_CONFIG_CASES: list[Case] = [
    (f"scheduler/{where}-{name}={value!r}", call, ConfigurationError, repr(value))
    for name in ("max_tokens_per_step", "prefill_chunk_size")
    for value in (0, -1, 1.5, True)
    for where, call in (
        ("init", lambda name=name, value=value: Scheduler(make_model(DIM), **{name: value})),
        ("set", lambda name=name, value=value: set_attr(scheduler(), name, value)),
    )
]


def add_dup() -> None:
    scheduler(req("dup")).add_request(req("dup"))


def add_shared_cache() -> None:
    shared = DenseKVCache()
    scheduler(req("a", cache=shared)).add_request(req("b", cache=shared))


ADD_REQUEST_CASES: list[Case] = [
    ("add/not-a-request", lambda: scheduler().add_request("r"), SchedulerError, "str"),
    ("add/none", lambda: scheduler().add_request(None), SchedulerError, "NoneType"),
    ("add/duplicate-active-id", add_dup, SchedulerError, "'dup'"),
    ("add/dim-mismatch", lambda: scheduler().add_request(req(p=prompt(3, 5))), SchedulerError, "dim 5"),
    ("add/already-prefilled", lambda: scheduler().add_request(req(prefill_pos=2)), SchedulerError, "prefill=2/3"),
    ("add/cache-has-rows", lambda: scheduler().add_request(req(cache=cache_with_rows())), SchedulerError,
     "cache_len=2"),
    ("add/has-tokens", lambda: scheduler().add_request(req(generated_tokens=[torch.zeros(DIM)])),
     SchedulerError, "generated=1/2"),
    ("add/shared-cache", add_shared_cache, SchedulerError, "'b'"),
    ("add/cache-on-meta", lambda: scheduler().add_request(req(cache=DenseKVCache("meta"))), SchedulerError,
     "meta"),
    ("add/prompt-float64", lambda: scheduler().add_request(req(p=prompt().double())), SchedulerError,
     "torch.float64 prompt"),
]

MODEL_CASES: list[Case] = [
    (f"model/dim={value!r}", lambda value=value: TinyLLM(value), ConfigurationError, repr(value))
    for value in (0, -1, 2.5, True)
] + [
    ("model/decode-two-rows", lambda: make_model(DIM).forward_decode(torch.ones(2, DIM), DenseKVCache()),
     ModelError, "2 rows"),
    ("model/prefill-list", lambda: make_model(DIM).forward_prefill_dense([[0.0] * DIM]), ModelError, "list"),
    ("model/prefill-float64", lambda: make_model(DIM).forward_prefill_dense(torch.ones(2, DIM, dtype=torch.float64)),
     ModelError, "torch.float64"),
]


def register_twice() -> None:
    m = PluginManager()
    m.register_scheduler_plugin(SchedPlugin())
    m.register_scheduler_plugin(SchedPlugin())


PLUGIN_CASES: list[Case] = [
    ("plugins/scheduler-as-attention", lambda: PluginManager().register_attention_plugin(SchedPlugin()),
     ValidationError, "SchedPlugin"),
    ("plugins/attention-as-cache", lambda: PluginManager().register_cache_plugin(AttnPlugin()),
     ValidationError, "CachePlugin"),
    ("plugins/not-a-plugin", lambda: PluginManager().register_scheduler_plugin(object()), ValidationError,
     "object"),
    ("plugins/duplicate-name", register_twice, ConfigurationError, "'SchedPlugin'"),
    ("plugins/get-unknown", lambda: manager_with(LevelPlugin()).get_plugin_config("nope"), ConfigurationError,
     "'nope'"),
    ("plugins/set-unknown", lambda: manager_with(LevelPlugin()).set_plugin_config("nope", {}),
     ConfigurationError, "'nope'"),
    ("plugins/set-unknown-key", lambda: manager_with(LevelPlugin()).set_plugin_config("LevelPlugin",
                                                                                      {"colour": 1}),
     ConfigurationError, "colour"),
    ("plugins/register-unknown-key", lambda: PluginManager().register_scheduler_plugin(LevelPlugin(),
                                                                                       {"colour": 1}),
     ConfigurationError, "colour"),
    ("plugins/option-less-plugin-key", lambda: manager_with(SchedPlugin()).set_plugin_config("SchedPlugin",
                                                                                             {"x": 1}),
     ConfigurationError, "'x'"),
]

def collector() -> MetricsCollector:
    return MetricsCollector(enable_memory_profiling=False)


def tracked(req_id: str = "a") -> MetricsCollector:
    c = collector()
    c.start_request_tracking(req_id, 4, step=3)
    return c


def step_stats(**changes: Any) -> dict[str, Any]:
    stats: dict[str, Any] = {"step_id": 0, "decode_tokens": 1, "prefill_tokens": 2, "total_tokens": 3,
                             "active_requests": 1, "finished_requests": 0, "step_duration": 0.01,
                             "status": "completed"}
    return stats | changes


METRICS_CASES: list[Case] = [
    ("metrics/negative-tokens", lambda: collector().record_step(**step_stats(decode_tokens=-1)), ValidationError,
     "-1"),
    ("metrics/total-mismatch", lambda: collector().record_step(**step_stats(total_tokens=4)), ValidationError, "4"),
    ("metrics/nan-duration", lambda: collector().record_step(**step_stats(step_duration=float("nan"))),
     ValidationError, "nan"),
    ("metrics/bad-status", lambda: collector().record_step(**step_stats(status="done")), ValidationError, "'done'"),
    ("metrics/track-twice", lambda: tracked("a").start_request_tracking("a", 4), ValidationError, "'a'"),
    ("metrics/unknown-request", lambda: collector().update_request_progress("ghost", decode_tokens=1),
     ValidationError, "'ghost'"),
    ("metrics/step-before-arrival", lambda: tracked("a").record_request_scheduled("a", 2), ValidationError,
     "step 2"),
    ("metrics/run-summary-no-blocks", lambda: collector().get_run_summary(num_blocks=0), ValidationError,
     "num_blocks"),
]


def write(name: str, text: str) -> Path:
    path = Path(tempfile.mkdtemp()) / name
    path.write_text(text)
    return path


CSV_HEADER = "req_id,arrival_step,prompt_len,max_new_tokens"
WORKLOAD_CASES: list[Case] = [
    ("workload/missing-file", lambda: load_workload(Path(tempfile.mkdtemp()) / "none.json"), ConfigurationError,
     "none.json"),
    ("workload/bad-suffix", lambda: load_workload(write("w.txt", "")), ConfigurationError, "'.txt'"),
    ("workload/not-json", lambda: load_workload(write("w.json", "{not json")), ValidationError, "w.json"),
    ("workload/negative-arrival", lambda: load_workload(write("w.csv", f"{CSV_HEADER}\na,-1,4,2\n")),
     ValidationError, "-1"),
    ("workload/missing-column", lambda: load_workload(write("w.csv", "req_id,arrival_step,prompt_len\na,0,4\n")),
     ValidationError, "max_new_tokens"),
    ("workload/duplicate-id", lambda: save_workload([RequestSpec("a", 0, 3, 1), RequestSpec("a", 1, 3, 1)],
                                                    Path(tempfile.mkdtemp()) / "w.json"), ConfigurationError,
     "'a'"),
    ("workload/length-dist", lambda: LengthDist.uniform(9, 3), ConfigurationError, "9"),
    ("workload/config-rate", lambda: WorkloadConfig(4, LengthDist.fixed(3), LengthDist.fixed(2), "poisson", -1.0),
     ConfigurationError, "-1.0"),
]

SERVING_CASES: list[Case] = [
    ("serving/unknown-preset", lambda: make_config("fifo"), ConfigurationError, "'fifo'"),
    ("serving/unknown-knob", lambda: make_config("static", colour=1), ConfigurationError, "colour"),
    ("serving/zero-blocks", lambda: ServingConfig(num_blocks=0), ConfigurationError, "num_blocks"),
    ("serving/prefix-caching-without-a-pool", lambda: ServingConfig(enable_prefix_caching=True), ConfigurationError,
     "num_blocks"),
    ("serving/pool-too-small", lambda: simulate([RequestSpec("big", 0, 40, 2)], make_config("continuous",
                                                num_blocks=2, block_size=4)), ConfigurationError, "'big'"),
]

def llama_step() -> LlamaStepModel:
    return LlamaStepModel(LlamaModel(LlamaConfig(dim=16, n_heads=2, n_kv_heads=1, ffn_dim=24)))


TOKEN_CASES: list[Case] = [
    ("sampling/max_tokens", lambda: SamplingParams(max_tokens=-1), ConfigurationError, "-1"),
    ("sampling/temperature", lambda: SamplingParams(temperature=-0.5), ConfigurationError, "-0.5"),
    ("sampling/top_k", lambda: SamplingParams(top_k=2.5), ConfigurationError, "2.5"),  # type: ignore[arg-type]
    ("sampling/top_p", lambda: SamplingParams(top_p=0.0), ConfigurationError, "top_p"),
    ("sampling/seed", lambda: SamplingParams(seed="x"), ConfigurationError, "'x'"),  # type: ignore[arg-type]
    ("request/negative-token-id", lambda: Request("t", torch.tensor([3, -1]), 2, DenseKVCache()), ValidationError,
     "-1"),
    ("request/sampling-not-params", lambda: Request("t", torch.tensor([3]), 2, DenseKVCache(), sampling=0.5),
     ValidationError, "0.5"),  # type: ignore[arg-type]
    ("request/id-token-as-vector", lambda: Request("t", torch.tensor([3]), 2, DenseKVCache()).append_token(
        torch.zeros(4)), ValidationError, "(4,)"),
    ("add/token-ids-to-a-vector-model", lambda: scheduler().add_request(Request("t", torch.tensor([3]), 2,
                                                                        DenseKVCache())), SchedulerError,
     "token ids"),
    ("add/vectors-to-a-token-model", lambda: Scheduler(llama_step()).add_request(req()), SchedulerError,
     "has dim 4"),
    ("model/llama-attention-plugin", lambda: llama_step().forward_prefill_ragged(
        torch.tensor([1, 2]), torch.ones(2, 2, dtype=torch.bool).tril(), attention_hooks=[object()]), ModelError,
     "attention plugins"),
]

ALL_CASES = (
    REQUEST_CASES + CACHE_CASES + BATCH_CASES + SCHEDULER_CONFIG_CASES + ADD_REQUEST_CASES + MODEL_CASES
    + PLUGIN_CASES + METRICS_CASES + WORKLOAD_CASES + SERVING_CASES + TOKEN_CASES
)
# Command-line arguments: a usage error (exit status 2) whose message names the value.
CLI_CASES: list[tuple[str, list[str], str]] = [
    ("cli/main-budget", ["--budget", "0", "--quick"], "--budget must be >= 1, got 0"),
    ("cli/main-cache", ["--cache", "tape"], "'tape'"),
    ("cli/simulate-policy", ["simulate", "--policy", "lifo"], "'lifo'"),
    ("cli/simulate-dist", ["simulate", "--output-dist", "normal:3:1"], "'normal:3:1'"),
    ("cli/compare-policies", ["compare", "--policies", "static,fifo"], "'fifo'"),
    ("cli/bench-running", ["fused", "--running", "many"], "'many'"),
]


def test_table_is_big_enough_and_ids_are_unique() -> None:
    ids = [case[0] for case in ALL_CASES] + [case[0] for case in CLI_CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)
    groups = {case_id.split("/")[0] for case_id in ids}
    assert groups >= {"request", "cache", "batch", "scheduler", "add", "plugins", "metrics", "workload", "cli"}


@pytest.mark.parametrize(("case_id", "call", "exc", "needle"), ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_bad_input(case_id: str, call: Callable[[], object], exc: type[Exception], needle: str) -> None:
    """Each refusal happens beside a scheduler with requests in flight, which then finishes them all, exact."""
    sched, model, reqs = running_scheduler()
    with pytest.raises(exc) as info:
        call()
    assert isinstance(info.value, CBLabException)
    assert needle in str(info.value), f"{case_id}: {needle!r} not in message {str(info.value)!r}"
    sched.run_until_complete(max_steps=100)
    assert not sched.active
    for r in reqs:
        assert_oracle(model, r)


@pytest.mark.parametrize(("case_id", "argv", "needle"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_command_line(case_id: str, argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    main = bench.main if case_id.startswith("cli/bench") else main_job.main
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err, case_id


# ---------------------------------------------------------------- state after a refusal
@pytest.mark.parametrize("name", ["max_tokens_per_step", "prefill_chunk_size"])
def test_refused_budget_keeps_the_old_value(name: str) -> None:
    sched = scheduler(max_tokens_per_step=6, prefill_chunk_size=3)
    old = getattr(sched, name)
    with pytest.raises(ConfigurationError):
        setattr(sched, name, 0)
    assert getattr(sched, name) == old
    setattr(sched, name, 5)  # a good value is still taken
    assert getattr(sched, name) == 5


def test_refused_plugin_is_not_registered_and_options_apply() -> None:
    m = PluginManager()
    with pytest.raises(ConfigurationError):
        m.register_scheduler_plugin(LevelPlugin(), {"colour": 1})
    assert m.list_plugins() == {"scheduler": [], "attention": [], "cache": []}
    m.register_scheduler_plugin(LevelPlugin(), {"level": "DEBUG"})
    assert m.get_plugin_config("LevelPlugin") == {"level": "DEBUG"}
    with pytest.raises(ConfigurationError):
        m.set_plugin_config("LevelPlugin", {"level": "WARNING", "colour": 1})
    assert m.get_plugin_config("LevelPlugin") == {"level": "DEBUG"}  # validated before applied
    m.set_plugin_config("LevelPlugin", {"level": "WARNING"})
    assert m.get_plugin_config("LevelPlugin") == {"level": "WARNING"}
    with pytest.raises(ValidationError):
        m.register_cache_plugin(LevelPlugin())  # wrong kind: nothing registered either
    assert m.list_plugins()["cache"] == []
    m.register_cache_plugin(type("Squash", (CachePlugin,), {})())
    assert m.list_plugins() == {"scheduler": ["LevelPlugin"], "attention": [], "cache": ["Squash"]}


# ---------------------------------------------------------------- a running scheduler is not disturbed
RUN_DIM = 8


def running_scheduler() -> tuple[Scheduler, TinyLLM, list[Request]]:
    model = make_model(RUN_DIM, 21)
    reqs = [
        make_request("r0", 6, 4, RUN_DIM, "dense"),
        make_request("r1", 3, 6, RUN_DIM, "paged", block_size=3),
        make_request("r2", 11, 2, RUN_DIM, "paged", block_size=2),
    ]
    sched = Scheduler(model, max_tokens_per_step=5, prefill_chunk_size=3)
    for r in reqs:
        sched.add_request(r)
    sched.step()
    sched.step()
    assert any(r.in_decode for r in reqs) and any(r.in_prefill for r in reqs)  # mid-flight
    return sched, model, reqs


def snapshot(sched: Scheduler) -> list[tuple]:
    return [
        (
            r.req_id, r.prefill_pos, r.finished, [t.clone() for t in r.generated_tokens],
            len(r.kv_cache), [x.clone() for x in r.kv_cache.get_kv()], r.kv_cache.hooks,
        )
        for r in sched.active
    ] + [(sched.step_id, sched.num_finished)]


def assert_same(before: list[tuple], after: list[tuple]) -> None:
    assert len(before) == len(after)
    for b, a in zip(before[:-1], after[:-1]):
        assert b[:3] == a[:3] and b[4] == a[4] and b[6] is a[6]
        assert len(b[3]) == len(a[3]) and all(torch.equal(x, y) for x, y in zip(b[3], a[3]))
        assert all(torch.equal(x, y) for x, y in zip(b[5], a[5]))
    assert before[-1] == after[-1]


def bad_adds(reqs: list[Request]) -> dict[str, Callable[[], object]]:
    """Each value builds one request (or object) that add_request must refuse mid-run."""
    r1_cache = reqs[1].kv_cache
    return {
        "not-a-request": lambda: {"req_id": "x"},
        "duplicate-id": lambda: make_request("r0", 2, 1, RUN_DIM),
        "same-object-again": lambda: reqs[2],
        "dim-mismatch": lambda: make_request("new", 3, 1, RUN_DIM + 1),
        "already-prefilled": lambda: Request("new", torch.randn(3, RUN_DIM), 1, DenseKVCache(), prefill_pos=1),
        "cache-has-rows": lambda: Request("new", torch.randn(3, RUN_DIM), 1, cache_with_rows(dim=RUN_DIM)),
        "has-tokens": lambda: Request("new", torch.randn(3, RUN_DIM), 3, DenseKVCache(),
                                      generated_tokens=[torch.zeros(RUN_DIM)]),
        "shares-running-cache": lambda: Request("new", torch.randn(3, RUN_DIM), 1, r1_cache),
        "cache-on-meta": lambda: Request("new", torch.randn(3, RUN_DIM), 1, DenseKVCache("meta")),
        "prompt-float64": lambda: Request("new", torch.randn(3, RUN_DIM, dtype=torch.float64), 1, DenseKVCache()),
    }


BAD_ADD_NAMES = list(bad_adds([make_request(f"r{i}", 2, 1, RUN_DIM) for i in range(3)]))


@pytest.mark.parametrize("name", BAD_ADD_NAMES)
def test_bad_add_request_mid_run_disturbs_nothing(name: str) -> None:
    sched, model, reqs = running_scheduler()
    before = snapshot(sched)
    bad = bad_adds(reqs)[name]()
    with pytest.raises(SchedulerError):
        sched.add_request(bad)
    assert_same(before, snapshot(sched))
    assert [r.req_id for r in sched.active] == ["r0", "r1", "r2"]
    sched.run_until_complete(max_steps=100)
    assert not sched.active and sched.num_finished == 3
    for r in reqs:
        assert_oracle(model, r)


def test_every_bad_add_between_steps_then_a_good_one() -> None:
    sched, model, reqs = running_scheduler()
    late = make_request("late", 5, 3, RUN_DIM, "paged", block_size=2)
    for make_bad in bad_adds(reqs).values():
        before = snapshot(sched)
        with pytest.raises(SchedulerError):
            sched.add_request(make_bad())
        assert_same(before, snapshot(sched))
        if sched.active:
            sched.step()
    sched.add_request(late)  # the scheduler still takes good requests
    sched.run_until_complete(max_steps=100)
    assert sched.num_finished == 4
    for r in [*reqs, late]:
        assert_oracle(model, r)


# ---------------------------------------------------------------- devices: "cpu" and "cpu:0" are one device
def test_add_request_accepts_a_cache_on_the_same_device_spelled_with_an_index() -> None:
    model = make_model(DIM)
    cache = DenseKVCache("cpu:0")
    cache_probe = DenseKVCache("cpu:0")
    cache_probe.append(torch.ones(1, DIM), torch.ones(1, DIM))  # the cache itself calls it the same device
    r = Request("r", prompt(), 2, cache)
    sched = Scheduler(model)
    sched.add_request(r)
    sched.run_until_complete()
    assert_oracle(model, r)
