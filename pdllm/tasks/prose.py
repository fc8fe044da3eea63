"""Varied English prose for haystacks, built offline from text already on the machine and shipped as an asset.

No internet here, so the prose comes from Python docstrings (standard library and installed packages) and the
license/README texts of installed packages. Sources are split by a hash of their path into a training part and a
held-out part, so evaluation hides needles in prose the model never saw while training. The split is built once
(`python -m pdllm.tasks.prose`) and committed, because another machine's Python would give other text.
"""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import re
import sys
import sysconfig
from pathlib import Path

PROSE_DIR = Path(__file__).resolve().parent.parent / "assets" / "prose"
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 20
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODEY = re.compile(r"(>>>|\.\.\.\s|[{}\[\]=<>|\\`]|::|\w\(\)|__\w+__|https?:|@)")


def split_of(source: str) -> str:
    """Stable train/held-out assignment of one source (file path without machine-specific prefix)."""
    digest = int(hashlib.sha256(source.encode()).hexdigest()[:8], 16)
    return "heldout" if digest % 100 < HELDOUT_PERCENT else "train"


def sentences_of(text: str) -> list[str]:
    """Plain ASCII sentences of natural prose: code-like lines, odd lengths and non-ASCII text are dropped."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(line.strip() for line in para.splitlines() if line.strip())
        if not para or not para.isascii():
            continue
        for sent in _SENTENCE_END.split(para):
            sent = sent.strip()
            if not 30 <= len(sent) <= 300 or _CODEY.search(sent) or sent[-1] not in ".!?":
                continue
            letters = sum(c.isalpha() or c == " " for c in sent)
            if letters < 0.85 * len(sent):
                continue
            out.append(sent)
    return out


def docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    return [d for d in (ast.get_docstring(n) for n in nodes) if d]


def iter_sources() -> list[tuple[str, str]]:
    """(source name, text) for every docstring-bearing Python file and every license/README text found."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(stdlib.rglob("*.py")):
        if "/test" in str(path) or "pdllm" in str(path):
            continue
        docs = docstrings(path)
        if docs:
            out.append((str(path.relative_to(stdlib)), "\n\n".join(docs)))
    for pattern in ("*.dist-info/**/LICENSE*", "*.dist-info/**/COPYING*", "*.dist-info/METADATA"):
        for path in sorted(stdlib.glob("site-packages/" + pattern)):
            try:
                out.append((str(path.relative_to(stdlib)), path.read_text(encoding="utf-8")))
            except (UnicodeDecodeError, OSError):
                continue
    return out


def build(out_dir: Path = PROSE_DIR, max_bytes: dict[str, int] | None = None) -> dict[str, int]:
    """Write <split>.txt.gz (one sentence a line, deduplicated across splits). Returns sentences per split."""
    max_bytes = max_bytes or {"train": 6_000_000, "heldout": 1_500_000}
    seen: set[str] = set()
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for name, text in iter_sources():
        split = split_of(name)
        for sent in sentences_of(text):
            if sent in seen or sizes[split] >= max_bytes[split]:
                continue
            seen.add(sent)
            parts[split].append(sent)
            sizes[split] += len(sent) + 1
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, sents in parts.items():
        with gzip.open(out_dir / f"{split}.txt.gz", "wt", encoding="ascii", compresslevel=9) as fh:
            fh.write("\n".join(sents) + "\n")
    return {s: len(v) for s, v in parts.items()}


@functools.lru_cache(maxsize=4)
def load_sentences(split: str) -> tuple[str, ...]:
    if split not in SPLITS:
        raise ValueError(f"unknown prose split {split!r}; choose from {', '.join(SPLITS)}")
    with gzip.open(PROSE_DIR / f"{split}.txt.gz", "rt", encoding="ascii") as fh:
        return tuple(line for line in fh.read().split("\n") if line)


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else PROSE_DIR))
