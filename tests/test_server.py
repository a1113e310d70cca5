"""``cb_lab serve`` through the official ``openai`` client on a loopback port: the same text as
``LLMEngine.generate``, streamed and not, concurrent, hung up on, refused, and counted."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from helpers import make_llama

from cb_lab import bench
from cb_lab.bench import serve as serve_bench
from cb_lab.engine import EngineConfig, LLMEngine
from cb_lab.sampling import SamplingParams
from cb_lab.server import RunningServer, cli, start_server
from cb_lab.workload_io import RequestSpec, save_workload

MODEL = make_llama(vocab_size=258)
CONFIG = EngineConfig(max_num_seqs=8, block_size=4, num_blocks=512, max_tokens_per_step=64, prefill_chunk_size=16)
PROMPTS = ["Continuous batching", "KV", "paged attention reads blocks", "é à ü", "the scheduler", "x" * 40]
NAME = "tiny"
TOKENIZER = LLMEngine(MODEL).tokenizer


def new_engine(config: EngineConfig = CONFIG) -> LLMEngine:
    return LLMEngine(copy.deepcopy(MODEL), config=config)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    s = start_server(new_engine(), NAME, max_waiting=512)
    yield s
    s.stop()


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def wait_idle(server: RunningServer) -> None:
    """Until the engine has no request left (bounded: a stuck request fails the test)."""
    deadline = time.monotonic() + 30
    while server.engine.engine.has_unfinished_requests() or server.engine.num_waiting:
        assert time.monotonic() < deadline, "requests still unfinished after 30 s"
        httpx.get(server.url + "/health")  # a round trip, not a sleep: the engine thread runs meanwhile


def test_concurrent_completions_equal_generate(server: RunningServer) -> None:
    expected = [o.text for o in new_engine().generate(PROMPTS, greedy(10))]
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)

    async def main() -> list[str]:
        answers = await asyncio.gather(*(aclient.completions.create(model=NAME, prompt=p, max_tokens=10,
                                                                     temperature=0) for p in PROMPTS))
        return [a.choices[0].text for a in answers]

    assert asyncio.run(main()) == expected


def test_a_streamed_completion_adds_up_to_the_whole_one(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=NAME, prompt="stream me", max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt="stream me", max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text == new_engine().generate("stream me", greedy(16))[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) <= {None}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    assert whole.usage is not None and whole.usage.prompt_tokens == len(TOKENIZER.encode("stream me"))


def test_chat_streamed_and_not_equals_engine_chat(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a KV cache?"}]
    expected = new_engine().chat(messages, greedy(12))[0].text
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert whole.choices[0].message.content == expected and whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=12,  # type: ignore[arg-type]
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_n_samples_and_several_prompts_number_their_choices(client: openai.OpenAI) -> None:
    answer = client.completions.create(model=NAME, prompt=["one", "two"], max_tokens=6, n=3, seed=7)
    params = SamplingParams(max_tokens=6, n=3, seed=7)
    expected = [c.text for out in new_engine().generate(["one", "two"], params) for c in out.outputs]
    assert [c.index for c in answer.choices] == list(range(6))
    assert [c.text for c in answer.choices] == expected
    assert answer.usage is not None and answer.usage.completion_tokens == 36


def test_token_id_prompts_stop_strings_and_logprobs(client: openai.OpenAI) -> None:
    ids = TOKENIZER.encode("ids in")
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2)
    (expected,) = new_engine().generate([ids], params)
    answer = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0, logprobs=2)
    choice = answer.choices[0]
    assert choice.text == expected.outputs[0].text and choice.logprobs is not None
    chosen = [lp[t].logprob for t, lp in zip(expected.outputs[0].token_ids, expected.outputs[0].logprobs or [])]
    assert choice.logprobs.token_logprobs == pytest.approx(chosen, abs=1e-5) and len(chosen) == 8
    assert all(1 <= len(top) <= 2 for top in choice.logprobs.top_logprobs or [])  # keyed by text: may collide
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content if chat.choices[0].logprobs else None
    assert content is not None and len(content) == 4
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob for t in content)
    stop = expected.outputs[0].text[3:5]
    cut = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == expected.outputs[0].text[:expected.outputs[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("body", "param", "needle"), [
    ({"model": NAME}, "prompt", "Field required"),
    ({"model": NAME, "prompt": "x", "temperature": -1}, "temperature", "greater than or equal"),
    ({"model": NAME, "prompt": "x", "max_token": 5}, "max_token", "Extra inputs"),
    ({"model": NAME, "prompt": "x", "max_tokens": 5000}, "max_tokens", "context"),
    ({"model": NAME, "prompt": "x", "temperature": "0.5"}, "temperature", "valid number"),
    ({"model": NAME, "prompt": "x", "max_tokens": True}, "max_tokens", "valid integer"),
    ({"model": NAME, "prompt": ["ok", 5]}, "prompt", "valid string"),
    ({"model": NAME, "prompt": []}, "prompt", "empty list"),
    ({"model": NAME, "prompt": [[5], [7, 999]]}, "prompt", "prompt 1: token id 999"),
    ({"model": NAME, "prompt": "x", "stop": ""}, "stop", "non-empty"),
    ({"model": NAME, "prompt": [3, 999]}, "prompt", "outside the model's vocabulary"),
    ({"model": NAME, "prompt": ""}, "prompt", "empty"),
    ({"model": NAME, "prompt": "x", "n": 0}, "n", "greater than or equal"),
])
def test_bad_bodies_get_openai_shaped_400s(server: RunningServer, body: dict[str, object], param: str,
                                           needle: str) -> None:
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert needle in error["message"]


def test_openai_bodies_as_clients_send_them(server: RunningServer, client: openai.OpenAI) -> None:
    """null for a default, top_k -1 (vLLM's off), content parts, the developer role, max_completion_tokens 0."""
    body = {"model": NAME, "prompt": "nulls", "max_tokens": 3, "temperature": None, "top_p": None, "n": None,
            "top_k": -1, "stream": None, "presence_penalty": None, "seed": None}
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": "hi"}]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    answers = [client.chat.completions.create(model=NAME, messages=m, max_tokens=5, temperature=0)  # type: ignore[arg-type]
               for m in (parts, plain)]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    none = client.chat.completions.create(model=NAME, messages=plain, max_completion_tokens=0)  # type: ignore[arg-type]
    assert none.choices[0].message.content == "" and none.usage is not None and none.usage.completion_tokens == 0
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=NAME, messages=plain, top_logprobs=2)  # type: ignore[arg-type]


def test_a_denormal_top_p_keeps_the_best_token_only(client: openai.OpenAI) -> None:
    tiny = client.completions.create(model=NAME, prompt="nucleus", max_tokens=6, top_p=5e-324, seed=1)
    assert tiny.choices[0].text == new_engine().generate("nucleus", greedy(6))[0].text


def test_routes_and_bodies_fastapi_refuses_are_openai_shaped_too(server: RunningServer) -> None:
    for method, path, status in (("GET", "/v1/completions", 405), ("GET", "/nope", 404), ("GET", "/v1/models/x", 404),
                                 ("POST", "/v1/completions", 400)):
        r = httpx.request(method, server.url + path, content=b"\xff{" if method == "POST" else None,
                          headers={"content-type": "application/json"})
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    assert httpx.head(server.url + "/health").status_code == 200


def test_a_prompt_list_larger_than_the_queue_is_a_400(server: RunningServer) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": ["x"] * 200, "n": 3})
    assert r.status_code == 400 and "600 samples, more than the queue holds" in r.json()["error"]["message"]


def test_bad_json_another_model_and_the_client_error_class(server: RunningServer, client: openai.OpenAI) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-9", prompt="x")
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=NAME, messages=[{"role": "robot", "content": "x"}])  # type: ignore[misc,list-item]


def test_models_health_and_metrics(server: RunningServer, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [NAME]
    assert httpx.get(server.url + "/health").status_code == 200
    before = metric(server, "cb_lab:generation_tokens_total")
    client.completions.create(model=NAME, prompt="count me", max_tokens=5, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    assert metric(server, "cb_lab:generation_tokens_total") == before + 5
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "request_success_total", "time_to_first_token_seconds_bucket",
                 "time_per_output_token_seconds_count", "e2e_request_latency_seconds_sum"):
        assert f"cb_lab:{name}" in text
    rss = metric(server, "process_resident_memory_bytes")  # the process's own figures, as prometheus_client gives
    assert rss == pytest.approx(psutil.Process().memory_info().rss, rel=0.2)  # this process serves the test


def metric(server: RunningServer, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_a_client_that_hangs_up_mid_stream_frees_its_blocks(server: RunningServer) -> None:
    body = {"model": NAME, "prompt": "hang up", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"] is not None
    wait_idle(server)  # the request left: aborted, not run to its 200 tokens
    assert server.engine.engine.pool.num_used_blocks == 0
    assert metric(server, "cb_lab:num_requests_running") == 0


def test_a_hundred_requests_at_once_none_lost(server: RunningServer) -> None:
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    prompts = [f"request {i}" for i in range(100)]

    async def main() -> list[openai.types.Completion]:
        return await asyncio.gather(*(aclient.completions.create(model=NAME, prompt=p, max_tokens=4, temperature=0,
                                                                  extra_body={"ignore_eos": True}) for p in prompts))

    answers = asyncio.run(main())
    assert all(a.usage is not None and a.usage.completion_tokens == 4 for a in answers)
    expected = [o.text for o in new_engine().generate(prompts, SamplingParams(max_tokens=4, temperature=0,
                                                                                ignore_eos=True))]
    assert [a.choices[0].text for a in answers] == expected
    wait_idle(server)
    assert server.engine.engine.pool.num_used_blocks == 0


def test_a_full_queue_answers_503(monkeypatch: pytest.MonkeyPatch) -> None:
    s = start_server(new_engine(), NAME, max_waiting=1)
    gate, real_step = threading.Event(), s.engine.engine.step
    monkeypatch.setattr(s.engine.engine, "step", lambda: gate.wait(60) and real_step())  # the engine holds still
    body = {"model": NAME, "prompt": "queued", "max_tokens": 4, "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", s.url + "/v1/completions", json=body) as queued:
            assert queued.status_code == 200  # taken: it waits in the queue while the step is held
            r = httpx.post(s.url + "/v1/completions", json={**body, "stream": False})
            assert r.status_code == 503 and "max_waiting=1" in r.json()["error"]["message"]
            gate.set()
            assert any(line == "data: [DONE]" for line in queued.iter_lines())
    finally:
        gate.set()
        s.stop()


def test_the_serve_command_starts_and_answers() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "cb_lab", "serve", "--model", "random", "--port", "0",
                             "--log-level", "warning", "--kv-memory-mb", "8"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        url = re.search(r"at (http://\S+)/v1", line)
        assert url, line
        client = openai.OpenAI(base_url=url.group(1) + "/v1", api_key="none", max_retries=0, timeout=60)
        (model,) = client.models.list()
        answer = client.completions.create(model=model.id, prompt="hi", max_tokens=3, temperature=0)
        assert answer.usage is not None and answer.usage.completion_tokens == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


VLLM_KEYS = {"completed", "failed", "request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
             "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms",
             "p99_itl_ms"}


def bench_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert bench.main(["serve", *argv, "--warmup", "0", "--json"]) == 0
    result: dict[str, object] = json.loads(capsys.readouterr().out)
    return result


def test_bench_serve_measures_a_running_server(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    before = metric(server, "cb_lab:generation_tokens_total")
    result = bench_json(["--base-url", server.url, "--num-prompts", "6", "--max-tokens", "5", "--ignore-eos",
                         "--endpoint", "completions", "--request-rate", "50", "--goodput", "e2el:600000"], capsys)
    assert VLLM_KEYS <= set(result)
    assert (result["completed"], result["failed"], result["total_output_tokens"]) == (6, 0, 30)
    assert metric(server, "cb_lab:generation_tokens_total") == before + 30  # what the server counted
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])  # every request within the SLO
    # From the server's /metrics after the run: nothing left in the batch or the queue.
    assert (result["server_running_after"], result["server_waiting_after"]) == (0, 0)
    assert isinstance(result["server_rss_growth_mb"], float)


def test_idle_connections_are_closed_by_the_client_first() -> None:
    # httpx (under the openai client) drops idle connections after keepalive_expiry; a server that closed
    # them at the same moment would race the client's next request on that connection.
    assert cli.KEEP_ALIVE_S > httpx.Limits(max_connections=None).keepalive_expiry == 5.0


def test_bench_serve_reads_nothing_from_a_server_without_metrics(server: RunningServer) -> None:
    assert asyncio.run(serve_bench.scrape(server.url + "/v1")) == {}  # /v1/metrics: 404, as transformers serve
    assert asyncio.run(serve_bench.scrape(server.url))["running"] == 0


def test_bench_serve_replays_a_workload_file(server: RunningServer, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    specs = [RequestSpec(f"r{i}", i, 6 + i, 3 + i, prefix_id=0 if i % 2 else None, prefix_len=4 if i % 2 else 0)
             for i in range(4)]
    save_workload(specs, tmp_path / "w.json")
    result = bench_json(["--base-url", server.url, "--workload", str(tmp_path / "w.json"), "--step-seconds", "0.01",
                         "--ignore-eos", "--endpoint", "chat"], capsys)
    assert (result["completed"], result["total_output_tokens"]) == (4, sum(s.max_new_tokens for s in specs))


def test_bench_serve_counts_failures_and_exits_1_when_none_completed(server: RunningServer,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["serve", "--base-url", server.url, "--model", "not-served", "--num-prompts", "2", "--json"]
    assert bench.main(argv) == 1
    result = json.loads(capsys.readouterr().out)
    assert (result["completed"], result["failed"]) == (0, 2) and "NotFoundError" in result["errors"][0]


def test_health_says_503_once_the_engine_has_stopped() -> None:
    s = start_server(new_engine(), NAME)
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        s.engine.shutdown()
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and "stopped" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and "takes no request" in r.json()["error"]["message"]
    finally:
        s.stop()
