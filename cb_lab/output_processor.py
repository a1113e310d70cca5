"""From requests' tokens to what the caller sees: text, stop strings, logprobs, ``n`` samples under one output.

vLLM's ``OutputProcessor`` in small. After every scheduler step, each sample still running
(``SampleState``, vLLM's ``RequestState``) takes its new token ids and::

    detokenizes only them        (IncrementalDetokenizer)
    looks for its stop strings   (check_stop_strings; cut the text, finish "stop": the engine then
                                  stops the request in the scheduler)
    turns new logprobs to dicts  ({token_id: Logprob}: the token, then the k best)

A request's ``n`` samples (the request itself, then the forks ``id.1`` ... the scheduler makes at
its first token) fill the ``CompletionOutput`` s of its one ``RequestOutput``, which is
``finished`` once all of them are. While a sample runs, its text holds back the last
``len(longest stop string) - 1`` characters (a stop string may be starting there), so text
already shown is never taken back.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from cb_lab.core.request import Request
from cb_lab.detokenizer import IncrementalDetokenizer, check_stop_strings
from cb_lab.model.tokenizer import Tokenizer
from cb_lab.outputs import CompletionOutput, Logprob, RequestOutput
from cb_lab.sampling import LogprobsTensors, SamplingParams

__all__ = ["OutputProcessor", "SampleState", "logprob_dicts"]


def logprob_dicts(lp: LogprobsTensors, k: int, tokenizer: Tokenizer | None) -> list[dict[int, Logprob]]:
    """One ``{token_id: Logprob}`` per row of ``lp``: the row's token first (with its rank), then its ``k``
    best ids (ranks 1..k); a best id that is the token itself keeps the token's entry."""
    ids, values, ranks = lp.logprob_token_ids[:, : 1 + k].tolist(), lp.logprobs[:, : 1 + k].tolist(), lp.ranks.tolist()
    rows = []
    for row_ids, row_values, rank in zip(ids, values, ranks):
        row: dict[int, Logprob] = {}
        for token, value, r in zip(row_ids, row_values, [rank, *range(1, k + 1)]):
            row.setdefault(token, Logprob(value, r, None if tokenizer is None else tokenizer.decode([token])))
        rows.append(row)
    return rows


class SampleState:
    """One sample of a request on its way out: its ``Request``, its text so far, its ``CompletionOutput``."""

    def __init__(self, req: Request, completion: CompletionOutput, params: SamplingParams,
                 tokenizer: Tokenizer | None) -> None:
        self.req, self.completion, self.params, self.tokenizer = req, completion, params, tokenizer
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        stop = params.stop or ()
        self.stop_buffer = max(map(len, stop)) - 1 if stop and not params.include_stop_str_in_output else 0

    def update(self) -> bool:
        """Take the request's new tokens (and its finish); False when nothing changed."""
        req, c = self.req, self.completion
        new = [int(t) for t in req.generated_tokens[len(c.token_ids):]]
        if not new and not req.finished:
            return False
        c.token_ids += new
        self._add_logprobs(len(new))
        delta = self.detokenizer.add(c.token_ids, finished=req.finished)
        text = self.detokenizer.text
        stopped = None
        if self.params.stop and len(c.token_ids) > self.params.min_tokens:
            stopped = check_stop_strings(text, len(delta), self.params.stop, self.params.include_stop_str_in_output)
        if stopped is not None:
            c.finish_reason, c.stop_reason = "stop", stopped[0]
            text = text[: stopped[1]]
        elif req.finished:
            c.finish_reason, c.stop_reason = req.finish_reason, req.stop_reason
        c.text = text if c.finished() or not self.stop_buffer else text[: max(len(text) - self.stop_buffer, 0)]
        return True

    def _add_logprobs(self, count: int) -> None:
        c, k = self.completion, self.params.logprobs
        if not count or k is None or c.logprobs is None or c.cumulative_logprob is None:
            return
        for lp in self.req.logprobs[len(c.logprobs) : len(c.logprobs) + count]:
            c.logprobs += logprob_dicts(lp, k, self.tokenizer)
            c.cumulative_logprob += float(lp.logprobs[0, 0])


class OutputProcessor:
    """The outputs of the requests not finished yet, and the state of their samples."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.outputs: dict[str, RequestOutput] = {}  # by request id
        self._samples: dict[str, SampleState] = {}  # by sample (scheduler request) id
        self._params: dict[str, SamplingParams] = {}  # by request id
        self._to_come: dict[str, tuple[str, int]] = {}  # sample ids the scheduler will fork -> (request id, index)

    def is_used(self, request_id: str) -> bool:
        """True when an unfinished request or one of its samples has this id."""
        return request_id in self.outputs or request_id in self._samples or request_id in self._to_come

    def add_request(self, req: Request, prompt: str | list[int], params: SamplingParams) -> RequestOutput:
        """Track a request just queued (``params``: as the caller gave them; ``n`` samples, all empty)."""
        asks = params.logprobs is not None
        out = RequestOutput(req.req_id, prompt, [int(t) for t in req.prompt], outputs=[
            CompletionOutput(i, "", [], 0.0 if asks else None, [] if asks else None) for i in range(params.n)],
            arrival_time=time.perf_counter())
        self.outputs[req.req_id], self._params[req.req_id] = out, params
        self._samples[req.req_id] = SampleState(req, out.outputs[0], params, self.tokenizer)
        if params.max_tokens > 0:  # the scheduler forks the others at the first token
            self._to_come |= {f"{req.req_id}.{i}": (req.req_id, i) for i in range(1, params.n)}
        return out

    def process_outputs(self, active: Iterable[Request]) -> tuple[list[RequestOutput], list[str]]:
        """After a step: the outputs that changed (a finished one for the last time), and the samples a stop
        string has finished, which the caller must stop in the scheduler."""
        if self._to_come:
            self._track_samples(active)
        now, changed, stopped = time.perf_counter(), {}, []
        for sample_id, state in list(self._samples.items()):
            before = len(state.completion.token_ids)
            if not state.update():
                continue
            out = self.outputs[state.req.parent_id or sample_id]
            if state.completion.index == 0:
                out.token_times += [now - out.arrival_time] * (len(state.completion.token_ids) - before)
                self._prompt_logprobs(out, state.req)
            if state.completion.finished():
                del self._samples[sample_id]
                if not state.req.finished:
                    stopped.append(sample_id)
                if state.req.max_new_tokens == 0:  # nothing was drawn, so nothing was forked: all end alike
                    for c in out.outputs[1:]:
                        c.finish_reason = state.completion.finish_reason
            changed[out.request_id] = out
        for out in changed.values():
            out.finished = all(c.finished() for c in out.outputs)
            if out.finished:
                del self.outputs[out.request_id], self._params[out.request_id]
        return list(changed.values()), stopped

    def abort(self, request_id: str) -> RequestOutput:
        """Finish every sample of a request that has not finished, "abort"; returns its output."""
        out = self.outputs.pop(request_id)
        del self._params[request_id]
        for sample_id in [i for i, s in self._samples.items() if (s.req.parent_id or i) == request_id]:
            del self._samples[sample_id]
        self._to_come = {i: owner for i, owner in self._to_come.items() if owner[0] != request_id}
        for c in out.outputs:
            if not c.finished():
                c.finish_reason = "abort"
        out.finished = True
        return out

    def _track_samples(self, active: Iterable[Request]) -> None:
        """Start following the samples the scheduler has just forked (or queued)."""
        for req in active:
            owner = self._to_come.pop(req.req_id, None)
            if owner is not None:
                request_id, index = owner
                completion = self.outputs[request_id].outputs[index]
                self._samples[req.req_id] = SampleState(req, completion, self._params[request_id], self.tokenizer)

    def _prompt_logprobs(self, out: RequestOutput, req: Request) -> None:
        """``out.prompt_logprobs`` once the request's prefill has recorded them all."""
        k = self._params[out.request_id].prompt_logprobs
        if k is None or out.prompt_logprobs is not None or req.num_prompt_logprobs < req.prompt_len - 1:
            return
        out.prompt_logprobs = [None, *(d for lp in req.prompt_logprobs for d in logprob_dicts(lp, k, self.tokenizer))]
