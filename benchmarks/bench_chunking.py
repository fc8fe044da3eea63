"""What text chunking costs against fixed chunks: chunk prefill time on the GPU, and the router's cut on the CPU.

A text cut ends chunks before the size (at a sentence, clause or word border), so a document has a few more chunks,
and a prefill batch of uneven chunks is padded and masked. Both are measured on real text (the held-out prose
corpus, and a kv_retrieval JSON of UUID pairs) read by the byte tokenizer, prefilled by encode_chunks (the prefill
actor's call) at the LLaDA-8B shape with random bf16 weights, chunks of 512, in the same run:
  chunks, mean length     how the document was cut
  padded%                 padding in the prefill batches (rows padded to their batch's longest chunk); text/doc
                          rows batch chunks in document order, as encode_chunks did before it sorted by length
  prefill s, tok/s        encode_chunks over the whole document (median of reps, after a warm-up)
  cut ms                  chunk_context on the CPU (the router's assembly does it once per request)
and the text / fixed ratios last.

    python benchmarks/bench_chunking.py --out $OUT/chunking.json     # on the GPU
    python benchmarks/bench_chunking.py --smoke                      # tiny shapes on CPU: the script runs
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench_e2e import LLADA_8B, TINY, random_model, timed

from pdllm.method import MethodConfig, chunk_context, encode_chunks
from pdllm.method.prefill import prefill_batches
from pdllm.models.loader import LoadedModel
from pdllm.models.tokenizer import build_byte_tokenizer
from pdllm.tasks import make_sample
from pdllm.tasks.haystack import fill, prose_sentences
from pdllm.tasks.sample import byte_counter

BATCH = 8  # encode_chunks' default batch, as the prefill actor runs it


def documents(tokens: int) -> dict[str, str]:
    """Prose and a JSON of pairs, each about `tokens` bytes."""
    prose = " ".join(fill(prose_sentences(random.Random(0), "heldout"), tokens, byte_counter))
    return {"prose": prose, "kv_json": make_sample("kv_retrieval", tokens, 0, byte_counter).context}


def padded_fraction(chunks: list[list[int]], batch: int, by_length: bool = True) -> float:
    """Share of the prefill batches' rows that is padding (each batch padded to its longest chunk, + BOS), batched
    as encode_chunks batches them (by length) or, `by_length=False`, in document order (as it did before)."""
    lengths = [len(c) + 1 for c in chunks]
    in_order = [list(range(lo, min(lo + batch, len(chunks)))) for lo in range(0, len(chunks), batch)]
    batches = prefill_batches(lengths, batch) if by_length else in_order
    real = sum(lengths)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - real / padded


def in_document_order(lm: LoadedModel, chunks: list[list[int]], method: MethodConfig) -> None:
    """Prefill batched as encode_chunks batched before it sorted by length: each run of BATCH chunks in document
    order is one batch (one call each, so nothing is sorted across them)."""
    for lo in range(0, len(chunks), BATCH):
        encode_chunks(lm, chunks[lo : lo + BATCH], method, lm.model_id, batch_size=BATCH)


def measure(lm: LoadedModel, tok, ids: list[int], chunking: str, chunk: int, reps: int, by_length: bool) -> dict:
    method = MethodConfig(chunk_size=chunk, chunking=chunking)
    t0 = time.perf_counter()
    for _ in range(5):
        chunks = chunk_context(tok, ids, method)
    cut_ms = 1000 * (time.perf_counter() - t0) / 5
    if by_length:
        seconds = timed(lambda: encode_chunks(lm, chunks, method, lm.model_id, batch_size=BATCH), reps)
    else:
        seconds = timed(lambda: in_document_order(lm, chunks, method), reps)
    return {
        "chunking": chunking if by_length else f"{chunking}/doc",
        "chunks": len(chunks),
        "mean_len": round(len(ids) / len(chunks), 1),
        "padded_pct": round(100 * padded_fraction(chunks, BATCH, by_length), 2),
        "prefill_s": round(seconds, 4),
        "tok_per_s": round(len(ids) / seconds),
        "cut_ms": round(cut_ms, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny model, short documents, CPU")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    spec = replace(TINY, bos_token_id=300, mask_token_id=301, eos_token_ids=(302,)) if args.smoke else LLADA_8B
    tokens, chunk = (2048, 128) if args.smoke else (args.tokens, args.chunk)
    lm = LoadedModel(random_model(spec, torch.device(device), dtype), None, spec, Path("."), f"random-{spec.family}")
    tok = build_byte_tokenizer()  # byte ids are valid ids of every shape here
    rows = []
    for name, text in documents(tokens).items():
        ids = tok(text, add_special_tokens=False).input_ids
        for chunking, by_length in (("fixed", True), ("text", False), ("text", True)):
            measured = measure(lm, tok, ids, chunking, chunk, args.reps, by_length)
            rows.append({"document": name, "tokens": len(ids), **measured})
    head = f"{'document':<9} {'chunking':<8} {'chunks':>6} {'mean len':>8} {'padded%':>7} {'prefill s':>9}"
    print(
        f"# {spec.family} {spec.num_layers}L d{spec.hidden_size}, {device}, {dtype}, chunks of {chunk}, batch {BATCH}"
    )
    print(head + f" {'tok/s':>8} {'cut ms':>7}")
    for r in rows:
        print(
            f"{r['document']:<9} {r['chunking']:<8} {r['chunks']:>6} {r['mean_len']:>8} {r['padded_pct']:>7}"
            f" {r['prefill_s']:>9} {r['tok_per_s']:>8} {r['cut_ms']:>7}"
        )
    for name in ("prose", "kv_json"):
        fixed, doc, text = (
            next(r for r in rows if r["document"] == name and r["chunking"] == c) for c in ("fixed", "text/doc", "text")
        )
        print(
            f"{name}: text / fixed prefill throughput {text['tok_per_s'] / fixed['tok_per_s']:.3f}x "
            f"(batched in document order: {doc['tok_per_s'] / fixed['tok_per_s']:.3f}x)"
        )
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if cuda else platform.processor(), "torch": torch.__version__}
        Path(args.out).write_text(json.dumps({"meta": meta, "args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
