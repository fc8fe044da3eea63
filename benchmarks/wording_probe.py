"""Which needle wordings does a model read? heldout_wording samples (held-out questions, distractor facts, every
value kind) whose needles all use one template at a time, scored per template.

The held-out table mixes five families; this splits a miss into its wording. Each template is a core such as
"my notebook lists {v} under the {s}." ({v}: the value, {s}: the subject); the samples are the same for every
template (same seeds), so rows differ only in the needle's words.

    python benchmarks/wording_probe.py [--model DIR] [--lengths 2048,8192] [--samples 12] [--device cpu] [TEMPLATE ...]
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

from pdllm.assets import default_model_dir
from pdllm.evaluation.runner import EvalConfig, run_eval
from pdllm.models.loader import load_model
from pdllm.tasks import facts

TEMPLATES = (
    *facts.HELDOUT_CORES,
    # the notebook family's order (value, then its subject) with other links, and its words in the other order
    "{v} is under the {s}.",
    "the memo keeps {v} under the {s}.",
    "I wrote {v} next to the {s}.",
    "my notebook lists {v} as the {s}.",
    "my notebook lists {v} beside the {s}.",
    "my notebook lists {v} by the {s}.",
    "my notebook lists the {s} as {v}.",
    # trained templates, for reference
    "{v} is the {s}.",
    "the {s} is {v}.",
)


def probe(model: str | None, templates: tuple[str, ...], lengths: tuple[int, ...], samples: int, device: str):
    """Per template: {length: (right, n)} and up to three (gold, answer) misses."""
    lm = load_model(model or default_model_dir(), device=device)
    method = {"chunk_size": 256, "top_k": 4}
    cfg = EvalConfig(("heldout_wording",), lengths, ("sparse",), samples, method=method)
    for template in templates:
        t0 = time.perf_counter()
        with mock.patch.object(facts, "HELDOUT_CORES", (template,)):
            records = run_eval(lm, cfg)
        cells = {n: (sum(r["score"] for r in records if r["length"] == n), samples) for n in lengths}
        misses = [(r["gold"], r["answer"]) for r in records if not r["score"]][:3]
        yield template, cells, misses, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("templates", nargs="*", help="needle cores with {v} and {s} (default: the set above)")
    p.add_argument("--model", help="model directory (default: the bundled model)")
    p.add_argument("--lengths", default="2048,8192")
    p.add_argument("--samples", type=int, default=12)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    lengths = tuple(int(n) for n in args.lengths.split(","))
    templates = tuple(args.templates) or TEMPLATES
    width = max(len(t) for t in templates)
    print(f"{'template':{width}s} " + " ".join(f"{n:>7d}" for n in lengths) + "   seconds  misses (gold, answer)")
    for template, cells, misses, seconds in probe(args.model, templates, lengths, args.samples, args.device):
        row = " ".join(f"{right:>4.0f}/{n:<2d}" for right, n in cells.values())
        print(f"{template:{width}s} {row} {seconds:8.0f}  {misses}", flush=True)


if __name__ == "__main__":
    main()
