"""A document asked about again is not tokenized again; the cache stays within its tokens and per tokenizer."""

from pdllm.context_tokens import MIN_CHARS, ContextTokens, context_tokens_for
from pdllm.prompt import encode_request


class CountingTokenizer:
    """Bytes as ids (plus an offset, so two tokenizers differ), counting the texts it tokenized."""

    def __init__(self, offset: int = 0) -> None:
        self.offset, self.texts = offset, []

    def __call__(self, text, add_special_tokens=False):
        self.texts.append(text)
        return type("Enc", (), {"input_ids": [b + self.offset for b in text.encode()]})()


DOC = "The vault code is 4471-KESTREL. " * (MIN_CHARS // 16)


def test_a_document_is_tokenized_once_for_every_question_about_it():
    tok = CountingTokenizer()
    first = encode_request(tok, DOC, "What is the vault code?")
    again = encode_request(tok, DOC, "Who keeps the vault?")
    assert again.context_ids == first.context_ids == list(DOC.encode())
    assert tok.texts.count(DOC) == 1 and context_tokens_for(tok).hits == 1
    other = CountingTokenizer(offset=1)  # another tokenizer never sees the first one's ids
    assert encode_request(other, DOC, "q").context_ids == [b + 1 for b in DOC.encode()]


def test_the_cache_keeps_the_most_recent_documents_within_its_tokens():
    tok, cache = CountingTokenizer(), ContextTokens(max_tokens=2 * len(DOC))
    docs = [DOC + str(i) * 4 for i in range(3)]
    for d in docs:
        cache.ids(tok, d)
    assert len(cache) == 1 and cache.tokens <= cache.max_tokens  # each is a little over half the budget
    assert cache.ids(tok, docs[2]) == list(docs[2].encode()) and tok.texts.count(docs[2]) == 1
    assert cache.ids(tok, docs[0]) == list(docs[0].encode()) and tok.texts.count(docs[0]) == 2  # evicted
    short = "a short note"
    cache.ids(tok, short)
    cache.ids(tok, short)
    assert tok.texts.count(short) == 2 and len(cache) == 1  # short texts are not kept
