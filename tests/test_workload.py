"""Workloads: seeded length distributions, arrivals, shared prefixes, files, and the requests built from them."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from helpers import make_model

from cb_lab.core.block_pool import BlockPool
from cb_lab.core.kv_cache import DenseKVCache, PagedKVCache
from cb_lab.core.scheduler import Scheduler
from cb_lab.exceptions import ConfigurationError, ValidationError
from cb_lab.model.oracle import oracle_error
from cb_lab.workload import (
    LengthDist,
    RequestSpec,
    WorkloadConfig,
    build_requests,
    generate_workload,
    load_workload,
    random_requests,
    run_workload,
    save_workload,
)

N = 4000  # draws per distribution check: a few ms each


def draw(dist: LengthDist, n: int = N, seed: int = 0) -> list[int]:
    return dist.sample(n, torch.Generator().manual_seed(seed))


def chat(**overrides: object) -> WorkloadConfig:
    """Poisson users, uniform prompts, long-tailed answers."""
    kwargs: dict[str, object] = dict(num_requests=12, prompt_lens=LengthDist.uniform(6, 12),
                                     output_lens=LengthDist.lognormal(4, 1.0, maximum=20), arrival="poisson", rate=2.0)
    return WorkloadConfig(**{**kwargs, **overrides})  # type: ignore[arg-type]


# --- seeding -------------------------------------------------------------------------------------


def test_same_seed_same_workload_and_prompts_other_seed_other() -> None:
    a, b, c = generate_workload(chat(seed=1)), generate_workload(chat(seed=1)), generate_workload(chat(seed=2))
    assert a == b and a != c
    assert [s.req_id for s in a] == [f"r{i:03d}" for i in range(12)]
    pa, pb = build_requests(a, dim=4, seed=5), build_requests(a, dim=4, seed=5)
    for (ta, ra), (tb, rb) in zip(pa, pb):
        assert ta == tb and ra.req_id == rb.req_id and ra.max_new_tokens == rb.max_new_tokens
        torch.testing.assert_close(ra.prompt, rb.prompt, rtol=0, atol=0)
    other = build_requests(a, dim=4, seed=6)
    assert all(not torch.equal(ra.prompt, ro.prompt) for (_, ra), (_, ro) in zip(pa, other))


def test_a_requests_rows_depend_on_its_seed_and_index_only() -> None:
    specs = [RequestSpec("a", 0, 5, 1), RequestSpec("b", 0, 7, 1)]
    longer_first = [RequestSpec("a", 0, 9, 1), RequestSpec("b", 0, 7, 1)]
    b_prompts = [build_requests(x, dim=4)[1][1].prompt for x in (specs, longer_first)]
    torch.testing.assert_close(b_prompts[0], b_prompts[1], rtol=0, atol=0)


def test_random_requests_draws_its_lengths_as_uniform_dists_do() -> None:
    reqs = random_requests(50, dim=4, prompt_lens=(2, 9), output_lens=(0, 5), seed=3)
    gen = torch.Generator().manual_seed(3)
    assert [r.prompt_len for r in reqs] == LengthDist.uniform(2, 9).sample(50, gen)
    assert [r.max_new_tokens for r in reqs] == LengthDist.uniform(0, 5).sample(50, gen)


# --- length distributions ------------------------------------------------------------------------


def test_fixed_and_uniform_bounds_are_inclusive() -> None:
    assert draw(LengthDist.fixed(7), 10) == [7] * 10 and draw(LengthDist.fixed(0), 3) == [0] * 3
    xs = draw(LengthDist.uniform(3, 9))
    assert set(xs) == set(range(3, 10))
    assert statistics.mean(xs) == pytest.approx(6, abs=0.2)


def test_lognormal_median_and_mean() -> None:
    xs = draw(LengthDist.lognormal(64, 1.0))
    assert statistics.median(xs) == pytest.approx(64, rel=0.1)
    assert statistics.mean(xs) == pytest.approx(64 * 1.6487, rel=0.1)  # median * exp(sigma**2 / 2)


def test_pareto_starts_at_its_scale_and_has_a_heavy_tail() -> None:
    xs = draw(LengthDist.pareto(10, 1.5, maximum=100_000))
    assert min(xs) == 10
    assert statistics.median(xs) == pytest.approx(10 * 2 ** (1 / 1.5), rel=0.1)
    assert max(xs) / statistics.median(xs) > 20  # a few answers are far longer than the typical one
    light = draw(LengthDist.lognormal(16, 0.25))
    assert max(light) / statistics.median(light) < 4


def test_draws_are_clipped_to_minimum_and_maximum() -> None:
    xs = draw(LengthDist.lognormal(40, 2.0, minimum=8, maximum=100))
    assert min(xs) == 8 and max(xs) == 100
    assert draw(LengthDist.pareto(1, 0.5, maximum=50)).count(50) > 100  # inf overflow included
    assert draw(LengthDist("uniform", 0, 10, minimum=2, maximum=5)).count(2) > N // 5


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: LengthDist("zipf", 1.0), "'zipf'"),
        (lambda: LengthDist.uniform(9, 3), "a=9, b=3"),
        (lambda: LengthDist.uniform(-1, 3), "a=-1"),
        (lambda: LengthDist.lognormal(0, 1.0), "a=0"),
        (lambda: LengthDist.lognormal(64, 0.0), "for no spread use fixed"),
        (lambda: LengthDist.pareto(10, -1.0), "b=-1.0"),
        (lambda: LengthDist.fixed(-2), "a=-2"),
        (lambda: LengthDist("lognormal", 8, float("nan")), "nan"),
        (lambda: LengthDist.lognormal(8, 1.0, minimum=10, maximum=5), "maximum 5 is below minimum 10"),
        (lambda: LengthDist.fixed(3).sample(-1, torch.Generator()), "n must be an int >= 0, got -1"),
    ],
)
def test_bad_length_dists_are_refused(make: object, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment.replace("(", r"\(")):
        make()  # type: ignore[operator]


# --- arrivals and prefixes -----------------------------------------------------------------------


def test_poisson_arrivals_are_sorted_with_mean_gap_one_over_rate() -> None:
    for rate in (0.25, 4.0):
        specs = generate_workload(chat(num_requests=2000, rate=rate))
        steps = [s.arrival_step for s in specs]
        assert steps == sorted(steps) and steps[0] >= 0
        assert (steps[-1] - steps[0]) / (len(steps) - 1) == pytest.approx(1 / rate, rel=0.1)
    assert {s.arrival_step for s in generate_workload(chat(arrival="all_at_once"))} == {0}


def test_shared_prefixes_give_equal_first_rows_and_different_rest() -> None:
    config = chat(num_requests=30, num_prefixes=3, prefix_len=5, prompt_lens=LengthDist.uniform(6, 12))
    specs = generate_workload(config)
    assert all(s.prefix_id in (0, 1, 2) and s.prefix_len == 5 for s in specs)
    pairs = build_requests(specs, dim=4, seed=1)
    groups: dict[int, list[torch.Tensor]] = {}
    for s, (_, req) in zip(specs, pairs):
        assert s.prefix_id is not None
        groups.setdefault(s.prefix_id, []).append(req.prompt)
    assert len(groups) == 3 and all(len(g) >= 2 for g in groups.values())
    for prompts in groups.values():
        for p in prompts[1:]:
            torch.testing.assert_close(p[:5], prompts[0][:5], rtol=0, atol=0)
            assert not torch.equal(p[5], prompts[0][5])
    firsts = [g[0][:5] for g in groups.values()]
    assert not torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[1], firsts[2])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(num_requests=0), "num_requests must be an int >= 1, got 0"),
        (dict(rate=0.0), "rate"),
        (dict(rate=-2), "got -2"),
        (dict(arrival="burst"), "'burst'"),
        (dict(num_prefixes=2), "num_prefixes=2 with prefix_len=0"),
        (dict(prefix_len=3), "num_prefixes=0 with prefix_len=3"),
        (dict(num_prefixes=2, prefix_len=7), "prefix_len=7"),  # prompts can be 6 rows
        (dict(prompt_lens=LengthDist.uniform(0, 4)), "prompt_lens.minimum is 0"),
        (dict(output_lens=(1, 5)), "output_lens must be a LengthDist"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_configs_are_refused(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment.replace("(", r"\(")):
        chat(**kwargs)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("", 0, 4, 1), "req_id"),
        (("r", -1, 4, 1), "arrival_step must be an int >= 0, got -1"),
        (("r", 0, 0, 1), "prompt_len must be an int >= 1, got 0"),
        (("r", 0, 4, 2.5), "max_new_tokens must be an int >= 0, got 2.5"),
        (("r", 0, 4, 1, 1, 0), "prefix_len is 0 with prefix_id 1"),
        (("r", 0, 4, 1, None, 2), "prefix_len is 2 with prefix_id None"),
        (("r", 0, 4, 1, 0, 5), "prefix_len 5 is longer than prompt_len 4"),
    ],
)
def test_bad_request_specs_are_refused(args: tuple[object, ...], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        RequestSpec(*args)  # type: ignore[arg-type]


# --- files ---------------------------------------------------------------------------------------


def mixed_specs() -> list[RequestSpec]:
    prefixed = generate_workload(chat(num_requests=5, num_prefixes=2, prefix_len=4, seed=9))
    plain = [RequestSpec("x", 3, 1, 0), RequestSpec("y,\"z\"", 7, 2, 5)]  # a zero-token request, a quoted id
    return prefixed + plain


@pytest.mark.parametrize("suffix", [".json", ".csv", ".CSV"])
def test_save_then_load_gives_the_same_specs(tmp_path: Path, suffix: str) -> None:
    specs = mixed_specs()
    save_workload(specs, tmp_path / f"w{suffix}")
    assert load_workload(str(tmp_path / f"w{suffix}")) == specs


def test_the_csv_has_the_documented_header(tmp_path: Path) -> None:
    save_workload([RequestSpec("r000", 0, 3, 2)], tmp_path / "w.csv")
    assert (tmp_path / "w.csv").read_text().splitlines() == [
        "req_id,arrival_step,prompt_len,max_new_tokens,prefix_id,prefix_len", "r000,0,3,2,,0"]
    (tmp_path / "short.json").write_text(json.dumps([{"req_id": "a", "arrival_step": 1, "prompt_len": 2,
                                                      "max_new_tokens": 3}]))
    assert load_workload(tmp_path / "short.json") == [RequestSpec("a", 1, 2, 3)]  # prefix fields may be left out


HEADER = "req_id,arrival_step,prompt_len,max_new_tokens,prefix_id,prefix_len\n"
GOOD = {"req_id": "a", "arrival_step": 0, "prompt_len": 4, "max_new_tokens": 2}


@pytest.mark.parametrize(
    ("name", "text", "fragments"),
    [
        ("bad.json", '[{"req_id": "a",', ["line 1", "not valid JSON"]),
        ("obj.json", json.dumps(GOOD), ["top level", "list"]),
        ("item.json", json.dumps([GOOD, 3]), ["item 1", "object"]),
        ("neg.json", json.dumps([GOOD, {**GOOD, "req_id": "b", "prompt_len": -3}]), ["item 1", "'prompt_len'", "-3"]),
        ("float.json", json.dumps([{**GOOD, "max_new_tokens": 2.5}]), ["item 0", "'max_new_tokens'", "2.5"]),
        ("bool.json", json.dumps([{**GOOD, "arrival_step": True}]), ["item 0", "'arrival_step'", "True"]),
        ("gap.json", json.dumps([{k: v for k, v in GOOD.items() if k != "arrival_step"}]), ["item 0", "arrival_step"]),
        ("typo.json", json.dumps([{**GOOD, "promt_len": 4}]), ["item 0", "promt_len"]),
        ("dup.json", json.dumps([GOOD, GOOD]), ["req_id 'a'", "own id"]),
        ("prefix.json", json.dumps([{**GOOD, "prefix_id": 0, "prefix_len": 9}]), ["'prefix_len'", "9"]),
        ("col.csv", "req_id,arrival_step,max_new_tokens\na,0,1\n", ["line 1", "prompt_len"]),
        ("neg.csv", HEADER + "a,0,4,1,,0\nb,0,-3,1,,0\n", ["line 3", "'prompt_len'", "-3"]),
        ("text.csv", HEADER + "a,0,4,lots,,0\n", ["line 2", "'max_new_tokens'", "'lots'"]),
        ("float.csv", HEADER + "a,0.5,4,1,,0\n", ["line 2", "'arrival_step'", "'0.5'"]),
        ("empty.csv", HEADER + "a,0,,1,,0\n", ["line 2", "prompt_len", "missing"]),
        ("extra.csv", HEADER + "a,0,4,1,,0,7\n", ["line 2", "beyond the header"]),
        ("nothing.csv", "", ["line 1", "req_id"]),
    ],
)
def test_malformed_files_name_the_file_the_row_and_the_field(
    tmp_path: Path, name: str, text: str, fragments: list[str]
) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ValidationError) as exc:
        load_workload(tmp_path / name)
    for fragment in [name, *fragments]:
        assert fragment in str(exc.value)


def test_unknown_suffix_and_missing_file_are_refused(tmp_path: Path) -> None:
    for call in (lambda: load_workload(tmp_path / "w.txt"), lambda: save_workload([], tmp_path / "w.yaml")):
        with pytest.raises(ConfigurationError, match=r"unknown suffix '\.(txt|yaml)'; name it \.json or \.csv"):
            call()
    with pytest.raises(ConfigurationError, match="nope.csv does not exist"):
        load_workload(tmp_path / "nope.csv")
    with pytest.raises(ConfigurationError, match="sequence of RequestSpec"):
        save_workload([GOOD], tmp_path / "w.json")  # type: ignore[list-item]
    assert not (tmp_path / "w.json").exists()


# --- requests and caches -------------------------------------------------------------------------


def test_build_requests_for_every_cache_kind_runs_to_the_oracle() -> None:
    specs = generate_workload(chat(num_requests=8, num_prefixes=2, prefix_len=3))
    model = make_model(8)
    for cache, cache_type in (("dense", DenseKVCache), ("paged", PagedKVCache), ("shared", PagedKVCache)):
        pairs = build_requests(specs, dim=8, cache=cache, block_size=4)
        reqs = [req for _, req in pairs]
        assert [t for t, _ in pairs] == [s.arrival_step for s in specs]
        assert [(r.req_id, r.prompt_len, r.max_new_tokens) for r in reqs] == [
            (s.req_id, s.prompt_len, s.max_new_tokens) for s in specs]
        assert all(type(r.kv_cache) is cache_type for r in reqs)
        if cache == "shared":
            pool = reqs[0].kv_cache.pool  # type: ignore[attr-defined]
            assert all(r.kv_cache.pool is pool for r in reqs)  # type: ignore[attr-defined]
            assert pool.num_blocks == sum(-(-(s.prompt_len + s.max_new_tokens) // 4) for s in specs)
        # the scheduler takes every request as it arrives: the shared pool never runs dry
        history = run_workload(Scheduler(model, 64, 16), pairs)
        assert all(r.finished for r in reqs) and len(history) > max(s.arrival_step for s in specs)
        assert oracle_error(model, reqs) < 1e-5
        if cache == "paged":  # a private pool each, made at the first append
            assert len({id(r.kv_cache.pool) for r in reqs}) == len(reqs)  # type: ignore[attr-defined]


def test_build_requests_uses_a_given_pool_and_checks_it() -> None:
    specs = [RequestSpec("a", 0, 5, 2), RequestSpec("b", 1, 3, 2)]
    pool = BlockPool(8, 4, 6)
    reqs = [req for _, req in build_requests(specs, dim=6, cache="shared", block_size=4, pool=pool)]
    assert all(r.kv_cache.pool is pool for r in reqs)  # type: ignore[attr-defined]
    for kwargs in (dict(dim=6, cache="dense", block_size=4), dict(dim=5, cache="shared", block_size=4),
                   dict(dim=6, cache="shared", block_size=16)):
        with pytest.raises(ConfigurationError, match="the pool holds dim 6, block_size 4"):
            build_requests(specs, pool=pool, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("specs", "kwargs", "fragment"),
    [
        ([RequestSpec("a", 0, 2, 1)], dict(dim=0), "dim must be an int >= 1, got 0"),
        ([RequestSpec("a", 0, 2, 1)], dict(dim=4, block_size=-1), "block_size must be an int >= 1, got -1"),
        ([RequestSpec("a", 0, 2, 1)], dict(dim=4, cache="tree"), "'tree'"),
        ([RequestSpec("a", 0, 2, 1)] * 2, dict(dim=4), "req_id 'a' appears at 0 and 1"),
        ([RequestSpec("a", 0, 4, 1, 0, 2), RequestSpec("b", 0, 4, 1, 0, 3)], dict(dim=4), "one prefix has one"),
        ([("a", 0, 2, 1)], dict(dim=4), "sequence of RequestSpec"),
    ],
)
def test_bad_build_arguments_are_refused(specs: list[RequestSpec], kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        build_requests(specs, **kwargs)  # type: ignore[arg-type]
