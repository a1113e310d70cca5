"""AsyncLLMEngine: one engine thread, many async callers; the same tokens as LLMEngine.generate."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Iterator

import pytest
from helpers import make_llama

from cb_lab.async_engine import AsyncLLMEngine, EngineStepError, QueueFullError
from cb_lab.engine import EngineConfig, LLMEngine, RequestOutput
from cb_lab.exceptions import ValidationError
from cb_lab.model.llama import LlamaModel
from cb_lab.sampling import SamplingParams

PROMPTS = ["Continuous batching", "KV", "paged attention reads blocks", "é à ü", "the scheduler", "x" * 40]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
CONFIG = EngineConfig(max_num_seqs=4, block_size=4, num_blocks=96, max_tokens_per_step=16, prefill_chunk_size=8)
MODEL = make_llama(vocab_size=258)


def new_engine(model: LlamaModel = MODEL, config: EngineConfig = CONFIG) -> LLMEngine:
    return LLMEngine(copy.deepcopy(model), config=config)


@pytest.fixture
def engine() -> Iterator[AsyncLLMEngine]:
    e = AsyncLLMEngine(new_engine())
    yield e
    e.shutdown()


async def last(engine: AsyncLLMEngine, prompt: str, params: SamplingParams = GREEDY) -> RequestOutput:
    outputs = [out async for out in engine.generate(prompt, params)]
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    return outputs[-1]


def test_concurrent_callers_get_the_tokens_generate_gives(engine: AsyncLLMEngine) -> None:
    expected = new_engine().generate(PROMPTS, GREEDY)

    async def main() -> list[RequestOutput]:
        return await asyncio.gather(*(last(engine, p) for p in PROMPTS))

    got = asyncio.run(main())
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [o.text for o in got] == [o.text for o in expected]
    assert engine.engine.pool.num_used_blocks == 0 and not engine.engine.has_unfinished_requests()


def test_outputs_grow_and_are_snapshots(engine: AsyncLLMEngine) -> None:
    async def main() -> list[RequestOutput]:
        return [out async for out in engine.generate("abc", GREEDY)]

    outputs = asyncio.run(main())
    lengths = [len(o.token_ids) for o in outputs]
    assert lengths == sorted(lengths) and lengths[-1] == 12 and len(set(lengths)) == len(lengths)


def test_a_caller_that_leaves_early_aborts_its_request(engine: AsyncLLMEngine) -> None:
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)

    async def main() -> tuple[int, RequestOutput]:
        async with contextlib.aclosing(engine.generate("leave early", long)) as outputs:
            async for out in outputs:
                seen = len(out.token_ids)
                break
        # aclosing ran the generator's abort; the engine thread takes it before the next request.
        return seen, await last(engine, "after", GREEDY)

    seen, after = asyncio.run(main())
    assert 1 <= seen < 60 and after.finish_reason == "length"
    assert engine.engine.pool.num_used_blocks == 0 and not engine.engine.outputs


def test_a_cancelled_task_aborts_its_request(engine: AsyncLLMEngine) -> None:
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)

    async def main() -> RequestOutput:
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate("cancel me", long):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await last(engine, "after")

    assert asyncio.run(main()).finished
    assert engine.engine.pool.num_used_blocks == 0 and not engine.engine.outputs


def test_a_bad_request_is_its_callers_error_only(engine: AsyncLLMEngine) -> None:
    async def main() -> RequestOutput:
        with pytest.raises(ValidationError, match="outside the model's vocabulary"):
            await engine.add_request([5, 999], GREEDY)
        with pytest.raises(ValidationError, match="empty"):
            await engine.add_request("", GREEDY)
        return await last(engine, "still fine")

    assert asyncio.run(main()).token_ids == new_engine().generate("still fine", GREEDY)[0].token_ids


def test_a_full_queue_is_refused() -> None:
    engine = AsyncLLMEngine(new_engine(config=EngineConfig(max_num_seqs=1, block_size=4, num_blocks=96)),
                            max_waiting=1)
    long = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)

    async def main() -> None:
        running = await engine.add_request("runs", long)
        await anext(running)  # it runs: the batch (max_num_seqs=1) is full
        waiting = await engine.add_request("waits", long)
        with pytest.raises(QueueFullError, match="max_waiting=1"):
            await engine.add_request("refused", long)
        running.abort()
        waiting.abort()

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engine: AsyncLLMEngine,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    executor = engine.engine.scheduler.executor
    real_run = executor.run
    calls = {"n": 0}

    def fail_once(plan):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected fault")
        return real_run(plan)

    monkeypatch.setattr(executor, "run", fail_once)

    async def main() -> RequestOutput:
        with pytest.raises(EngineStepError, match="injected fault"):
            await last(engine, "unlucky")
        return await last(engine, "lucky")

    lucky = asyncio.run(main())
    assert lucky.token_ids == new_engine().generate("lucky", GREEDY)[0].token_ids
    assert engine.engine.pool.num_used_blocks == 0


def test_shutdown_fails_the_callers_still_waiting() -> None:
    engine = AsyncLLMEngine(new_engine())
    long = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)

    async def main() -> None:
        stream = await engine.add_request("never finishes", long)
        await anext(stream)
        assert engine.is_running
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineStepError, match="engine stopped"):
            async for _ in stream:
                pass

    asyncio.run(main())
    assert not engine.is_running
