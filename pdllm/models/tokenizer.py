"""A byte-level tokenizer (256 byte tokens + specials) for the small models this project makes and ships.

Built with `tokenizers` and saved in the Hugging Face layout, so `AutoTokenizer` loads it offline like any other.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

EOS, BOS, MASK, PAD = "<|endoftext|>", "<|startoftext|>", "<|mdm_mask|>", "<|pad|>"
SPECIALS = (EOS, BOS, MASK, PAD)
BYTE_VOCAB = 256


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for the 256 byte values (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def special_ids() -> dict[str, int]:
    return {tok: BYTE_VOCAB + i for i, tok in enumerate(SPECIALS)}


def build_byte_tokenizer():
    """A PreTrainedTokenizerFast over bytes: id b is byte b; specials follow at 256.."""
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    vocab.update(special_ids())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=BOS, mask_token=MASK, pad_token=PAD)


def save_byte_tokenizer(out_dir: str | Path) -> None:
    build_byte_tokenizer().save_pretrained(str(out_dir))
