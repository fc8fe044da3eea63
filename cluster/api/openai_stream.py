"""The text a streamed answer may send before it is finished: only what can no longer change.

A diffusion LM unmasks tokens anywhere inside the current block, so the partial text of a step is not a prefix of
the answer. Generation is semi-autoregressive, though: tokens of later blocks stay masked until their block runs,
and an unmasked token is never masked again. So whenever a step event's unmasked-token count is a whole number of
blocks, every unmasked token belongs to a finished block and its partial text is final up to the end (a text ending
in an incomplete character is held back). Stop sequences are cut here as in the unary answer, holding back a tail
that could still begin one. The streamed text therefore always equals the unary answer.
"""

from __future__ import annotations

from pdllm.cluster.api.openai_schema import cut_at_stop


class StableText:
    def __init__(self, block_length: int, stops: tuple[str, ...] = ()) -> None:
        self.block_length, self.stops = block_length, stops
        self.sent = ""  # text already handed out
        self.stopped = False  # a stop sequence ended the answer: nothing more is sent

    def _advance(self, text: str, final: bool) -> str:
        if self.stopped:
            return ""
        text, self.stopped = cut_at_stop(text, self.stops)
        if not final and not self.stopped:
            text = text.rstrip("\ufffd")  # a character cut between two blocks
            hold = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            text = text[: len(text) - hold]
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def step(self, event: dict) -> str:
        """The new final text a step event makes known ("" if none)."""
        unmasked = int(event.get("unmasked_tokens", 0))
        if unmasked == 0 or unmasked % self.block_length:
            return ""
        return self._advance(str(event.get("partial_text", "")), final=False)

    def finish(self, answer: str) -> str:
        """The rest of the finished answer (the whole answer is `answer` cut at a stop sequence)."""
        return self._advance(answer, final=True)
