"""Text chunking (pdllm.method.boundaries, chunks.split_chunks): chunks end at sentence, clause or word borders."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pdllm.errors import InvalidRequest
from pdllm.method import MethodConfig, chunk_context, split_chunks
from pdllm.method.boundaries import CLAUSE, NONE, SENTENCE, WORD, TextBreaks, token_classes
from pdllm.models.tokenizer import build_byte_tokenizer
from pdllm.tasks import make_sample
from pdllm.tasks.sample import byte_counter

PROSE = (
    "The river rose at dawn, and the mill stopped. Nobody in the valley had seen it so high! "
    "Was the dam safe? The engineer said it held 3.14 million litres; she checked it twice.\n"
    "By noon the water fell again. The miller, tired but glad, opened the sluice. "
) * 6


@pytest.fixture(scope="module")
def byte_tok():
    return build_byte_tokenizer()


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def check_cover(chunks: list[list[int]], ids: list[int], size: int) -> None:
    """Chunks concatenate to the context, none is longer than `size`, every one but the last holds at least half."""
    assert [t for c in chunks for t in c] == ids
    assert all(len(c) <= size for c in chunks)
    assert all(len(c) >= (size + 1) // 2 for c in chunks[:-1])


@pytest.mark.parametrize(
    "text, alone, before_space, opens",
    [
        (".", NONE, SENTENCE, 0),
        ('."', NONE, SENTENCE, 0),  # a closing quote after the full stop
        (". ", SENTENCE, SENTENCE, 0),
        (",", NONE, CLAUSE, 0),
        (" the", NONE, WORD, 1),
        ("\n", SENTENCE, WORD, 2),
        (" ", WORD, WORD, 1),
        ("-", NONE, WORD, 0),
        ("", NONE, WORD, 0),
    ],
)
def test_token_classes(text, alone, before_space, opens):
    assert token_classes(text) == (alone, before_space, opens)


def test_borders_by_strength_and_a_decimal_point_is_no_sentence_end(byte_tok):
    text = "ab. cd, ef 3.5\ngh"
    levels = TextBreaks.of(byte_tok).levels(ids_of(byte_tok, text))
    at = {i: levels[i] for i in range(len(text))}  # the border before character i (one byte each)
    assert at[text.index(" cd")] == SENTENCE
    assert at[text.index(" ef")] == CLAUSE
    assert at[text.index(" 3.5")] == WORD
    assert at[text.index(".5")] == NONE and at[text.index("5")] == NONE  # "3.5" is not cut at its point
    assert at[text.index("\n")] == SENTENCE and at[text.index("gh")] == SENTENCE
    assert at[0] == NONE and at[text.index("b")] == NONE


def test_text_chunks_end_at_sentence_ends_in_prose(byte_tok):
    ids = ids_of(byte_tok, PROSE)
    chunks = chunk_context(byte_tok, ids, MethodConfig(chunk_size=128))
    check_cover(chunks, ids, 128)
    for c in chunks[:-1]:
        end = byte_tok.decode(c).rstrip()
        assert end[-1] in ".!?;", end[-20:]  # a sentence (or, where none fits, a clause) ends every chunk
    assert byte_tok.decode(chunks[0]).endswith("Was the dam safe?")  # the last sentence end that fits
    fixed = chunk_context(byte_tok, ids, MethodConfig(chunk_size=128, chunking="fixed"))
    assert fixed == split_chunks(ids, 128) and all(len(c) == 128 for c in fixed[:-1])


def test_text_chunks_never_cut_a_json_pair(byte_tok):
    """kv_retrieval's JSON: a UUID cut by a border was the bundle's most common miss beyond 2K."""
    sample = make_sample("kv_retrieval", 4096, 3, byte_counter)
    ids = ids_of(byte_tok, sample.context)
    for size in (128, 256, 500):
        chunks = chunk_context(byte_tok, ids, MethodConfig(chunk_size=size))
        check_cover(chunks, ids, size)
        pairs = [byte_tok.decode(c).strip().strip("{},").strip() for c in chunks]
        for text in pairs:  # whole '"key": "value"' pairs only: each chunk is a valid JSON body on its own
            assert json.loads("{" + text + "}")
    fixed = chunk_context(byte_tok, ids, MethodConfig(chunk_size=256, chunking="fixed"))
    with pytest.raises(json.JSONDecodeError):
        for c in fixed:
            json.loads("{" + byte_tok.decode(c).strip().strip("{},").strip() + "}")


def test_text_without_any_border_is_cut_at_the_size(byte_tok):
    ids = ids_of(byte_tok, "x" * 1000)
    assert chunk_context(byte_tok, ids, MethodConfig(chunk_size=300)) == split_chunks(ids, 300)


def test_short_and_empty_contexts(byte_tok):
    assert chunk_context(byte_tok, [], MethodConfig(chunk_size=64)) == []
    one = ids_of(byte_tok, "A short note. Only one chunk.")
    assert chunk_context(byte_tok, one, MethodConfig(chunk_size=64)) == [one]
    assert split_chunks([5], 1, TextBreaks.of(byte_tok)) == [[5]]


def test_chunking_is_checked():
    with pytest.raises(InvalidRequest, match="chunking must be one of text, fixed"):
        MethodConfig(chunking="sentences").validate()


def trained_bpe(pre_tokenizer, decoder) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained here on PROSE: merged tokens such as 'Ġthe' or '▁the' carry their space."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizer, decoder
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(pre_tokenizer, pre_tokenizers.ByteLevel) else []
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"], initial_alphabet=alphabet)
    tok.train_from_iterator([PROSE], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.mark.parametrize(
    "pre, dec",
    [
        (pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()),  # GPT-2 / Qwen2 (Dream) style
        (pre_tokenizers.Metaspace(), decoders.Metaspace()),  # SentencePiece style: decode strips a leading space
    ],
)
def test_a_merged_vocabulary_keeps_its_leading_spaces_and_cuts_at_sentences(pre, dec):
    tok = trained_bpe(pre, dec)
    ids = ids_of(tok, PROSE)
    assert len(ids) < len(PROSE) * 0.7  # merges happened: tokens are words, not bytes
    spaced = [i for i in range(len(tok)) if tok.convert_ids_to_tokens(i)[:1] in ("Ġ", "▁") and len(tok.decode([i])) > 1]
    breaks = TextBreaks.of(tok)
    assert spaced and all(token_classes(breaks.token_text(i))[2] == 1 for i in spaced)
    chunks = chunk_context(tok, ids, MethodConfig(chunk_size=48))
    check_cover(chunks, ids, 48)
    ends = [tok.decode(c).rstrip()[-1] for c in chunks[:-1]]
    assert ends.count(".") + ends.count("!") + ends.count("?") >= len(ends) - 1, ends
