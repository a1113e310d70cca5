"""``python -m cb_lab bench serve``: a load generator for any OpenAI-compatible server.

::

    python -m cb_lab serve &                                         # or vLLM, SGLang, transformers serve
    python -m cb_lab bench serve --base-url http://127.0.0.1:8000 --num-prompts 64 --request-rate 4
    python -m cb_lab bench serve --launch random --quick             # serve in this process; also offline

It speaks only the OpenAI API (streamed completions or chats through the ``openai`` client), so the
same command measures any server. Arrivals are a Poisson process at ``--request-rate`` per
second (``inf``: all at once), at most ``--max-concurrency`` in flight; ``--workload FILE`` replays
a serving-simulation workload instead (its ``arrival_step`` times ``--step-seconds``; a prompt of
``prompt_len`` words, the first ``prefix_len`` shared by its ``prefix_id``). It prints vLLM's
figures (``vllm bench serve``): completed and failed requests, request and token throughput,
TTFT, TPOT and ITL (mean, median, p99), end-to-end latency, goodput under ``--goodput`` SLOs;
``--json`` prints them as one object with vLLM's keys. The first ``--warmup`` requests go first, at
the same arrivals, and are not counted; where the server has a Prometheus ``/metrics`` (``cb_lab
serve`` does) it also prints the server's memory growth from the end of the warm-up to the end of
the run and what is left in its pool and batch (a soak: a long run at a steady rate, nothing left
over and no growth). ``--launch MODEL`` starts ``cb_lab serve``
in this process and first runs the same prompts through the offline ``LLMEngine.generate``, so
the server's overhead comes out as a ratio from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from cb_lab.cli_generate import build_engine
from cb_lab.engine import RequestOutput
from cb_lab.exceptions import CBLabException, ValidationError
from cb_lab.progress import ProgressBar
from cb_lab.sampling import SamplingParams
from cb_lab.server.cli import start_server
from cb_lab.workload_io import load_workload

__all__ = ["add_parser"]


@dataclass(frozen=True, slots=True)
class Job:
    """One request to send: its prompt, its ``max_tokens``, when (seconds after the start)."""

    prompt: str
    max_tokens: int
    at: float


@dataclass(slots=True)
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0  # seconds to the first streamed text
    itl: list[float] = field(default_factory=list)  # seconds between streamed chunks
    latency: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (vLLM's TPOT)."""
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="load an OpenAI-compatible server: vLLM's serving figures")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (without /v1)")
    p.add_argument("--launch", metavar="NAME|PATH|random",
                   help="start cb_lab serve with this model in this process (ignores --base-url) and compare "
                        "with offline generate on the same prompts")
    p.add_argument("--model", help="the model name to send (default: the server's first in /v1/models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="chat")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second (default inf)")
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: no limit)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1, help="requests sent first and not counted (default 1: a "
                   "server that loads or compiles on its first request)")
    p.add_argument("--ignore-eos", action="store_true", help="ask for exactly max_tokens (a vLLM extension)")
    p.add_argument("--prompts", type=Path, help="a .json list of strings or a text file, one prompt per line")
    p.add_argument("--workload", type=Path, help="a serving-simulation workload (.json or .csv)")
    p.add_argument("--step-seconds", type=float, default=0.05, help="seconds per arrival_step of --workload")
    p.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:2000 tpot:100 e2el:10000 (milliseconds)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="--launch: the engine's batch capacity")
    p.add_argument("--json", action="store_true", help="one JSON object with vLLM's keys")
    p.add_argument("--quick", action="store_true", help="8 prompts of 8 tokens")
    p.set_defaults(main=main, apply_quick=apply_quick)


def apply_quick(args: argparse.Namespace) -> None:
    args.num_prompts, args.max_tokens, args.warmup = min(args.num_prompts, 8), min(args.max_tokens, 8), 0


def load_prompts(path: Path | None) -> list[str]:
    if path is None:
        return resources.files("cb_lab.bench").joinpath("chat_questions.txt").read_text().splitlines()
    text = path.read_text()
    prompts = json.loads(text) if path.suffix == ".json" else text.splitlines()
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValidationError(f"{path}: expected a non-empty list of non-empty strings (JSON) or lines of text")
    return prompts


def make_jobs(args: argparse.Namespace) -> list[Job]:
    rng = random.Random(args.seed)
    if args.workload is not None:
        return [Job(_words(spec.prompt_len, spec.prefix_id, spec.prefix_len), spec.max_new_tokens,
                    spec.arrival_step * args.step_seconds) for spec in load_workload(args.workload)]
    prompts, at, jobs = load_prompts(args.prompts), 0.0, []
    for i in range(args.num_prompts):
        jobs.append(Job(prompts[i % len(prompts)], args.max_tokens, at))
        at += rng.expovariate(args.request_rate) if args.request_rate != float("inf") else 0.0
    return jobs


def _words(length: int, prefix_id: int | None, prefix_len: int) -> str:
    """About ``length`` tokens of text; requests of one ``prefix_id`` share the first ``prefix_len``."""
    shared = [f"p{prefix_id}w{i}" for i in range(prefix_len)] if prefix_id is not None else []
    own = [f"w{random.randrange(10**6)}" for _ in range(length - len(shared))]
    return " ".join(shared + own)


async def send(client: openai.AsyncOpenAI, args: argparse.Namespace, model: str, job: Job) -> RequestResult:
    """One streamed request, timed chunk by chunk."""
    result, extra = RequestResult(), {"ignore_eos": True} if args.ignore_eos else None
    start = last = time.perf_counter()
    try:
        if args.endpoint == "chat":
            stream: Any = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": job.prompt}], max_tokens=job.max_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True}, extra_body=extra)
        else:
            stream = await client.completions.create(
                model=model, prompt=job.prompt, max_tokens=job.max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body=extra)
        async for chunk in stream:
            now = time.perf_counter()
            text = "".join((c.delta.content or "") if args.endpoint == "chat" else c.text for c in chunk.choices)
            if text and not result.ttft:
                result.ttft = now - start
            elif text:
                result.itl.append(now - last)
            last = now if text else last
            if chunk.usage is not None:
                result.output_tokens, result.prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
    except openai.APIError as error:  # counted as failed, as vLLM's benchmark does; the run goes on
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = result.output_tokens or len(result.itl) + (1 if result.ttft else 0)
    result.ok = True
    return result


# What a server's /metrics says before and after the run, where it has them (cb_lab serve does; a
# server without a Prometheus /metrics gives nothing): memory, and what is left in the pool and batch.
_WATCHED = {"process_resident_memory_bytes": "rss_bytes", "cb_lab:kv_cache_usage_perc": "kv_cache_usage",
            "cb_lab:num_requests_running": "running", "cb_lab:num_requests_waiting": "waiting"}


async def scrape(base_url: str) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(base_url + "/metrics")
    if response.status_code != 200 or not response.headers.get("content-type", "").startswith("text/plain"):
        return {}
    return {_WATCHED[s.name]: s.value for family in text_string_to_metric_families(response.text)
            for s in family.samples if s.name in _WATCHED}


async def drive(client: openai.AsyncOpenAI, args: argparse.Namespace, model: str, jobs: list[Job],
                label: str) -> tuple[list[RequestResult], float]:
    """Send ``jobs`` at their arrival times (at most ``--max-concurrency`` in flight); the results
    and the seconds from the first arrival to the last answer."""
    limit = asyncio.Semaphore(args.max_concurrency or max(1, len(jobs)))
    bar = ProgressBar(label, len(jobs))
    done = 0
    start = time.perf_counter()

    async def one(job: Job) -> RequestResult:
        nonlocal done
        await asyncio.sleep(max(0.0, start + job.at - time.perf_counter()))  # the arrival process
        async with limit:
            result = await send(client, args, model, job)
        done += 1
        bar(0, done)
        return result

    results = await asyncio.gather(*(one(job) for job in jobs))
    bar.close()
    return list(results), time.perf_counter() - start


async def run_load(args: argparse.Namespace, base_url: str, jobs: list[Job],
                   slos: dict[str, float]) -> dict[str, Any]:
    """A warm-up (the first ``--warmup`` jobs, same arrivals, not counted), then every job; the
    summary, with the server's memory growth and leftovers from its /metrics when it has one."""
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=600)
    model = args.model or (await client.models.list()).data[0].id
    if args.warmup:
        await drive(client, args, model, jobs[: args.warmup], "warm-up")
    before = await scrape(base_url)
    summary = summarize(*await drive(client, args, model, jobs, "bench serve"), slos)
    after = await scrape(base_url)
    await client.close()
    if "rss_bytes" in before and "rss_bytes" in after:
        summary["server_rss_growth_mb"] = (after["rss_bytes"] - before["rss_bytes"]) / 2**20
    for key in ("kv_cache_usage", "running", "waiting"):
        if key in after:
            summary[f"server_{key}_after"] = after[key]
    return summary


def _stats(name: str, values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1e3 for v in values) or [0.0]
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {f"mean_{name}_ms": statistics.fmean(ms), f"median_{name}_ms": statistics.median(ms),
            f"std_{name}_ms": statistics.pstdev(ms), f"p99_{name}_ms": p99}


def summarize(results: list[RequestResult], duration: float, slos: dict[str, float]) -> dict[str, Any]:
    """vLLM's ``bench serve`` figures (its keys) from the requests' timings."""
    ok = [r for r in results if r.ok]
    out_tokens, in_tokens = sum(r.output_tokens for r in ok), sum(r.prompt_tokens for r in ok)

    def good(r: RequestResult) -> bool:
        seen = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
        return all(seen[key] * 1e3 <= limit for key, limit in slos.items())

    summary: dict[str, Any] = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "request_goodput": sum(good(r) for r in ok) / duration if slos else None,
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }
    summary |= _stats("ttft", [r.ttft for r in ok])
    summary |= _stats("tpot", [t for r in ok if (t := r.tpot) is not None])
    summary |= _stats("itl", [t for r in ok for t in r.itl])
    summary |= _stats("e2el", [r.latency for r in ok])
    return summary


def parse_slos(items: list[str]) -> dict[str, float]:
    slos = {}
    for item in items:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not value.replace(".", "", 1).isdigit():
            raise ValidationError(f"--goodput {item!r}: give KEY:MS with KEY ttft, tpot or e2el, e.g. ttft:2000")
        slos[key] = float(value)
    return slos


def _row(label: str, value: float, fmt: str = ">12.2f") -> str:
    return f"{label + ':':<40}{value:{fmt}}"


def report(summary: dict[str, Any]) -> str:
    """The figures as ``vllm bench serve`` prints them."""
    lines = [_row("Successful requests", summary["completed"], ">12"),
             _row("Failed requests", summary["failed"], ">12"),
             _row("Benchmark duration (s)", summary["duration"]),
             _row("Total input tokens", summary["total_input_tokens"], ">12"),
             _row("Total generated tokens", summary["total_output_tokens"], ">12"),
             _row("Request throughput (req/s)", summary["request_throughput"]),
             _row("Output token throughput (tok/s)", summary["output_throughput"]),
             _row("Total token throughput (tok/s)", summary["total_token_throughput"])]
    if summary["request_goodput"] is not None:
        lines.append(_row("Request goodput (req/s)", summary["request_goodput"]))
    for key, label in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"{label:-^52}")
        lines += [_row(f"{stat.capitalize()} {key.upper()} (ms)", summary[f"{stat}_{key}_ms"])
                  for stat in ("mean", "median", "p99")]
    if "server_vs_offline" in summary:
        lines += [f"{' Against offline generate ':-^52}", f"model: {summary['model']}",
                  _row("Offline output throughput (tok/s)", summary["offline_output_throughput"]),
                  _row("Server / offline", summary["server_vs_offline"]),
                  _row("KV blocks in use after", summary["blocks_in_use_after"], ">12")]
    if "server_rss_growth_mb" in summary:  # from the server's /metrics
        lines += [f"{' The server after the run ':-^52}",
                  _row("RSS growth after warm-up (MB)", summary["server_rss_growth_mb"], ">12.1f"),
                  _row("KV cache usage (share of blocks)", summary.get("server_kv_cache_usage_after", 0.0)),
                  _row("Requests still running", summary.get("server_running_after", 0.0), ">12.0f"),
                  _row("Requests still waiting", summary.get("server_waiting_after", 0.0), ">12.0f")]
    return "\n".join(lines + [f"error: {e}" for e in summary["errors"]])


def main(args: argparse.Namespace) -> int:
    base_url = args.base_url.rstrip("/").removesuffix("/v1")  # the server, as clients say it or not
    try:
        slos, jobs = parse_slos(args.goodput), make_jobs(args)
        if args.launch is None:
            summary = asyncio.run(run_load(args, base_url, jobs, slos))
        else:
            summary = launch_and_load(args, jobs, slos)
    except CBLabException as error:  # a bad flag, file or model: said in one line
        print(f"bench serve: {error}", file=sys.stderr)
        return 2
    except openai.APIConnectionError:
        print(f"bench serve: nothing answers at {base_url}; start a server there (python -m cb_lab serve) "
              "or give --launch MODEL", file=sys.stderr)
        return 1
    print(json.dumps(summary) if args.json else report(summary))
    return 0 if summary["completed"] else 1


def launch_and_load(args: argparse.Namespace, jobs: list[Job], slos: dict[str, float]) -> dict[str, Any]:
    """The jobs' prompts through the offline ``generate`` (all at once), then the same jobs through
    ``cb_lab serve`` on the same engine here: the server's share of the offline throughput."""
    model_args = argparse.Namespace(model=args.launch, max_num_seqs=args.max_num_seqs, block_size=16,
                                    kv_memory_mb=256.0, num_blocks=None, no_prefix_caching=False)
    engine, about = build_engine(model_args)
    params = [SamplingParams(max_tokens=j.max_tokens, temperature=0.0, ignore_eos=args.ignore_eos) for j in jobs]
    prompts = [j.prompt for j in jobs]

    def offline() -> list[RequestOutput]:
        if args.endpoint == "chat":
            return engine.chat([[{"role": "user", "content": p}] for p in prompts], params, progress=False)
        return engine.generate(prompts, params, progress=False)

    offline()  # a warm-up: both runs below find the same caches and allocations
    start = time.perf_counter()
    tokens = sum(len(out.token_ids) for out in offline())
    offline_tok_s = tokens / (time.perf_counter() - start)
    server = start_server(engine, args.model or "cb-lab", max_waiting=max(256, len(jobs)))
    try:
        summary = asyncio.run(run_load(args, server.url, jobs, slos))
    finally:
        server.stop()
    summary["blocks_in_use_after"] = engine.pool.num_used_blocks  # 0: nothing leaked
    summary["model"] = about
    summary["offline_output_throughput"] = offline_tok_s
    summary["server_vs_offline"] = summary["output_throughput"] / offline_tok_s
    return summary
