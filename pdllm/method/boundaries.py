"""Where a chunk may end: the strength of the border before each context token, read off the tokenizer's own tokens.

A fixed-size cut lands inside a sentence, a JSON pair or a value about as often as such a span is long against the
chunk size, and the two halves are then ranked apart: a needle whose second half's chunk is not selected is lost.
Text chunking (`chunks.split_chunks` with these breaks) ends each chunk at the strongest border in the last half of
its window instead: a line or sentence end, else a clause end (comma, semicolon), else a word border, else anywhere.
"""

from __future__ import annotations

import threading
import weakref

import torch

NONE, WORD, CLAUSE, SENTENCE = 0, 1, 2, 3  # border strengths; a line end counts as a sentence end
SENTENCE_END = set(".!?\u2026\u3002\uff01\uff1f")
CLAUSE_END = set(",;\uff0c\uff1b")
CLOSERS = "\"')]}\u00bb\u201d\u2019"  # closing quotes and brackets after the punctuation: 'He left." Then'


def token_classes(text: str) -> tuple[int, int, int]:
    """(border after this token on its own, border after it when the next token opens with whitespace, how it
    opens: 0 text, 1 whitespace, 2 a line break) of one token's decoded text."""
    core = text.rstrip()
    tail = text[len(core) :]
    opens = 2 if text[:1] in ("\n", "\r") else 1 if text[:1].isspace() else 0
    if not core:  # whitespace only
        return (SENTENCE if "\n" in tail else WORD if tail else NONE), WORD, opens
    last = core.rstrip(CLOSERS)[-1:]
    kind = SENTENCE if last in SENTENCE_END else CLAUSE if last in CLAUSE_END else WORD
    alone = SENTENCE if "\n" in tail else kind if tail else NONE
    return alone, kind, opens


class TextBreaks:
    """Per-token border classes of one tokenizer, each token's read from its text the first time a context holds it
    (`TextBreaks.of` keeps one per tokenizer; a 126K vocabulary is never decoded whole)."""

    _built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, tokenizer):
        self.tokenizer = weakref.ref(tokenizer)  # not a strong one: the registry's key would then live forever
        self.anchor = tokenizer("a", add_special_tokens=False).input_ids[:1]
        self.lead = len(tokenizer.decode(self.anchor))
        self.classes = torch.zeros(0, 3, dtype=torch.uint8)  # [ids seen so far, (alone, before_space, opens)]
        self.known = torch.zeros(0, dtype=torch.bool)
        self.lock = threading.Lock()

    @classmethod
    def of(cls, tokenizer) -> TextBreaks:
        """The breaks of `tokenizer`, kept while the tokenizer lives."""
        with cls._lock:
            found = cls._built.get(tokenizer)
            if found is None:
                found = cls._built[tokenizer] = cls(tokenizer)
        return found

    def token_text(self, token: int) -> str:
        """The token's text as it reads inside running text (decoded after an anchor token, so a leading space that
        a decoder strips at the start of a text is kept)."""
        return self.tokenizer().decode(self.anchor + [token])[self.lead :]

    def _classes_of(self, t: torch.Tensor) -> torch.Tensor:
        """[len(t), 3] classes of the ids in `t`, decoding the ids not seen before."""
        with self.lock:
            top = int(t.max()) + 1
            if top > len(self.known):
                grow = top - len(self.known)
                self.classes = torch.cat([self.classes, torch.zeros(grow, 3, dtype=torch.uint8)])
                self.known = torch.cat([self.known, torch.zeros(grow, dtype=torch.bool)])
            new = torch.unique(t[~self.known[t]])
            if len(new):
                self.classes[new] = torch.tensor(
                    [token_classes(self.token_text(int(i))) for i in new], dtype=torch.uint8
                )
                self.known[new] = True
            return self.classes[t]

    def levels(self, ids: list[int]) -> bytes:
        """Border strength before each position (index 0, the start, is NONE), one byte per token."""
        if len(ids) < 2:
            return bytes(len(ids))
        t = torch.tensor(ids, dtype=torch.long)
        alone, before_space, opens = self._classes_of(t).unbind(1)
        level = torch.maximum(alone[:-1], before_space[:-1] * (opens[1:] > 0))
        level = torch.maximum(level, (opens[1:] == 2).to(torch.uint8) * SENTENCE)
        return bytes(1) + level.numpy().tobytes()
