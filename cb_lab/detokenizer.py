"""Text as tokens arrive, without decoding a request's whole output every step.

Decoding all of a request's ids each step costs O(length) per step, O(length²) per request.
Instead (as vLLM and HF's streamers do) keep two offsets into the ids: text up to ``read`` has
been shown; ``prefix`` marks where the last shown piece began. Each step decodes only
``ids[prefix:]`` and shows what it adds beyond ``ids[prefix:read]``::

    ids    [ ........ shown ........ | prefix ... read | new ids ]
    delta = decode(ids[prefix:]) - decode(ids[prefix:read])      (a suffix)

A byte-level token can end inside a multi-byte character (an emoji is often two tokens); its
text then ends with U+FFFD, so the piece is held back until a later token completes it, or the
request finishes. A model without a tokenizer (token ids only) has no text: ``text`` stays "".

Stop strings (``SamplingParams.stop``) are looked for in the new text only, plus the few
characters before it that a stop string could start in (``check_stop_strings``, as vLLM does):
O(new) per step too.
"""

from __future__ import annotations

from collections.abc import Sequence

from cb_lab.model.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "check_stop_strings"]


class IncrementalDetokenizer:
    """The text of one request's generated ids, grown a step at a time."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self.prefix = 0  # where the last shown piece starts
        self.read = 0  # ids up to here are in ``text``

    def add(self, ids: list[int], finished: bool = False) -> str:
        """``ids``: all the request's generated ids so far. Returns the new text (maybe ""), also added
        to ``text``. When ``finished``, whatever is held back is shown as it decodes."""
        if self.tokenizer is None:
            return ""
        shown = self.tokenizer.decode(ids[self.prefix : self.read])
        grown = self.tokenizer.decode(ids[self.prefix :])
        if len(grown) <= len(shown) or (grown.endswith("\ufffd") and not finished):
            return ""  # nothing new, or a character still incomplete
        delta = grown[len(shown) :]
        self.text += delta
        self.prefix, self.read = self.read, len(ids)
        return delta


def check_stop_strings(text: str, new_chars: int, stop: Sequence[str],
                       include_stop_str: bool) -> tuple[str, int] | None:
    """The stop string that ``text``'s last ``new_chars`` characters complete, and where to cut ``text``
    (before it, or after it with ``include_stop_str``); None when there is none. The earliest one wins."""
    if not new_chars:
        return None
    # A stop string may start up to len(s) - 1 characters before the new text.
    hits = [(at, s) for s in stop if (at := text.find(s, max(len(text) - new_chars - len(s) + 1, 0))) != -1]
    if not hits:
        return None
    at, s = min(hits, key=lambda hit: hit[0])
    return s, at + len(s) if include_stop_str else at
