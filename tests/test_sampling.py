"""SamplingParams' vLLM fields (checked by name), the penalties and min_tokens against a plain per-row
reference, and raw logprobs against torch's log_softmax."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cb_lab.exceptions import ConfigurationError
from cb_lab.sampling import SamplingParams, compute_logprobs, sample_batch

V = 40


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(rows, V, generator=torch.Generator().manual_seed(seed))


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kwargs, needle", [
    ({"logprobs": -1}, "logprobs must be an int >= 0 or None, got -1"),
    ({"prompt_logprobs": 1.5}, "prompt_logprobs must be an int >= 0 or None, got 1.5"),
    ({"stop": ""}, "stop must be a string or a list of non-empty strings, got ''"),
    ({"stop": ["ok", 3]}, r"stop must be .*\['ok', 3\]"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output must be a bool, got 'yes'"),
    ({"min_tokens": -1}, "min_tokens must be an int >= 0, got -1"),
    ({"min_tokens": 20}, "min_tokens=20 must be at most max_tokens=16; lower min_tokens or raise max_tokens"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty must be a number > 0 \(1: off\), got 0.0"),
    ({"frequency_penalty": 2.5}, r"frequency_penalty must be in \[-2, 2\] \(0: off\), got 2.5"),
    ({"presence_penalty": -3}, r"presence_penalty must be in \[-2, 2\] \(0: off\), got -3"),
    ({"presence_penalty": True}, "presence_penalty must be in"),
])
def test_bad_values_are_named_with_the_fix(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigurationError, match=needle):
        SamplingParams(**kwargs)


def test_vllm_defaults_and_stop_strings_as_a_tuple() -> None:
    p = SamplingParams()
    assert (p.logprobs, p.prompt_logprobs, p.stop, p.include_stop_str_in_output, p.min_tokens) == (
        None, None, None, False, 0)
    assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (1.0, 0.0, 0.0)
    assert SamplingParams(stop="###").stop == ("###",) and SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert hash(SamplingParams(stop=["a"])) == hash(SamplingParams(stop=("a",)))
    assert SamplingParams(prompt_logprobs=2, n=3).sample_params(1).prompt_logprobs is None


def penalized_reference(row: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """vLLM's penalties on one row, one id at a time."""
    out = row.clone()
    for token in set(prompt) | set(output):
        out[token] = out[token] / p.repetition_penalty if out[token] > 0 else out[token] * p.repetition_penalty
    for token in set(output):
        out[token] -= p.frequency_penalty * output.count(token) + p.presence_penalty
    return out


PENALTIES = [SamplingParams(temperature=0.0, repetition_penalty=1.7),
             SamplingParams(temperature=0.0, frequency_penalty=1.5),
             SamplingParams(temperature=0.0, presence_penalty=-1.2, repetition_penalty=0.6),
             SamplingParams(temperature=0.0),
             SamplingParams(temperature=0.0, frequency_penalty=0.7, presence_penalty=2.0, repetition_penalty=1.3)]


def test_greedy_with_penalties_takes_the_argmax_of_the_penalized_row() -> None:
    x = logits(len(PENALTIES), seed=1)
    history = [(ids(6, 10 + r), ids(r * 3, 20 + r)) for r in range(len(PENALTIES))]
    got = sample_batch(x, PENALTIES, ["r"] * len(PENALTIES), [len(h[1]) for h in history], history=history)
    want = [int(penalized_reference(x[r], p, history[r][0].tolist(), history[r][1].tolist()).argmax())
            for r, p in enumerate(PENALTIES)]
    assert got.tolist() == want
    assert got.tolist() != x.argmax(-1).tolist(), "the penalties changed some choices"


def test_with_penalties_a_row_samples_the_same_alone_or_in_a_batch() -> None:
    params = [SamplingParams(temperature=0.9, seed=s, top_k=10, frequency_penalty=1.0, repetition_penalty=1.2)
              for s in range(4)] + [SamplingParams(temperature=0.8, seed=9)]
    x = logits(len(params), seed=2)
    history = [(ids(5, r), ids(4, 30 + r)) for r in range(len(params))]
    names = [f"q{r}" for r in range(len(params))]
    batch = sample_batch(x, params, names, [4] * len(params), history=history)
    alone = [int(sample_batch(x[r : r + 1], [params[r]], [names[r]], [4], history=[history[r]])[0])
             for r in range(len(params))]
    assert batch.tolist() == alone


def test_min_tokens_suppresses_eos_and_stop_ids_until_then() -> None:
    x = torch.zeros(3, V)
    x[:, 7] = x[:, 9] = 10.0  # the EOS (7) and a stop id (9) are by far the most likely
    params = [SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(9,)),
              SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(9,)),
              SamplingParams(temperature=0.0, stop_token_ids=(9,))]
    x[:, 11] = 5.0
    got = sample_batch(x, params, ["a", "b", "c"], [2, 3, 0], eos_token_ids=[7, 7, 7]).tolist()
    assert got[0] == 11 and got[1] in (7, 9) and got[2] in (7, 9)  # only the row still under min_tokens
    ignore = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True)
    assert int(sample_batch(x[:1], [ignore], ["d"], [0], eos_token_ids=[7])[0]) in (7, 9)  # EOS does not stop it


def test_logprobs_are_the_raw_log_softmax_with_ranks_and_the_best_ids() -> None:
    x = logits(4, seed=3)
    tokens = torch.tensor([0, 5, 17, int(x[3].argmax())])
    lp = compute_logprobs(x, tokens, 3)
    want = torch.log_softmax(x, -1)
    torch.testing.assert_close(lp.logprobs[:, 0], want.gather(1, tokens[:, None])[:, 0])
    assert lp.logprob_token_ids[:, 0].tolist() == tokens.tolist()
    assert lp.logprob_token_ids[:, 1:].tolist() == want.argsort(-1, descending=True)[:, :3].tolist()
    ranks = [int((want[r] >= want[r, t]).sum()) for r, t in enumerate(tokens.tolist())]
    assert lp.ranks.tolist() == ranks and ranks[3] == 1
    assert compute_logprobs(x, tokens, 0).logprobs.shape == (4, 1)
