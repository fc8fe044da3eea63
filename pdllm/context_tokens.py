"""Token ids of documents seen recently, by content.

The product's premise is one document asked about many times; tokenizing it again for every question costs more than
the rest of the router's work (a 32K-token document: tens of ms, a 128K one: ~0.15 s on a CPU core). Ids are kept
per tokenizer object, keyed by a digest of the text, least recently used dropped past `max_tokens` (stored as 4-byte
ints: 16M tokens take 64 MiB).
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from array import array
from collections import OrderedDict

DEFAULT_MAX_TOKENS = 16 << 20
MIN_CHARS = 4096  # shorter texts are tokenized every time (cheap, and not worth an entry)


class ContextTokens:
    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[bytes, array] = OrderedDict()
        self.tokens = 0
        self.hits = 0
        self._lock = threading.Lock()

    def ids(self, tokenizer, text: str) -> list[int]:
        """tokenizer(text).input_ids without special tokens, from the cache when this text was seen."""
        if len(text) < MIN_CHARS:
            return tokenizer(text, add_special_tokens=False).input_ids
        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=20).digest()
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return found.tolist()
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) <= self.max_tokens and max(ids, default=0) < 2**31:
            with self._lock:
                if key not in self._entries:
                    self._entries[key] = array("i", ids)
                    self.tokens += len(ids)
                while self.tokens > self.max_tokens:
                    _, old = self._entries.popitem(last=False)
                    self.tokens -= len(old)
        return ids

    def __len__(self) -> int:
        return len(self._entries)


_BY_TOKENIZER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BY_TOKENIZER_LOCK = threading.Lock()


def context_tokens_for(tokenizer) -> ContextTokens:
    """The process's cache for `tokenizer` (gone with the tokenizer object)."""
    with _BY_TOKENIZER_LOCK:
        cache = _BY_TOKENIZER.get(tokenizer)
        if cache is None:
            cache = _BY_TOKENIZER[tokenizer] = ContextTokens()
        return cache
