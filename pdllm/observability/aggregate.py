"""Merge metric samples from other processes (Ray actors) into the exporting process's families.

Why: a Ray actor's prometheus_client registry lives in the actor's process, which nothing scrapes. Instead every
actor puts `metrics.snapshot()` (plain lists: msgpack/pickle/JSON friendly) into the status dict it already
returns, and the one process that serves /metrics (the API server) adds those samples to its own at scrape time.
Counters and histogram buckets add up across processes (every process defines the same buckets, from the same
module); gauges add up too, which is right because each actor reports its own label values (its own actor name,
its own queue) and a queue reported by several processes is the sum of its parts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.metrics_core import Metric

SNAPSHOT_VERSION = 1
Sample = tuple[str, dict[str, str], float]
_SUFFIXES = ("", "_total", "_bucket", "_sum", "_count", "_created", "_gsum", "_gcount")


def family_samples(families: Iterable[Metric]) -> list[list]:
    """[[sample name, labels, value], ...] for every sample except the per-process `_created` timestamps."""
    out: list[list] = []
    for fam in families:
        for s in fam.samples:
            if not s.name.endswith("_created"):
                out.append([s.name, dict(s.labels), float(s.value)])
    return out


def _key(name: str, labels: dict[str, str]) -> tuple:
    return (name, tuple(sorted((str(k), str(v)) for k, v in labels.items())))


def merge(local: Iterable[Metric], remote: Iterable[Iterable[list]]) -> Iterator[Metric]:
    """Families of `local` with every remote sample added to the sample of the same name and labels.

    Remote samples whose name no local family owns are dropped: the exporting process defines every pdllm metric
    (same module), so an unknown name means a version skew, and exporting it without type information would be wrong.
    """
    families = list(local)
    owner: dict[str, int] = {}
    for i, fam in enumerate(families):
        for suffix in _SUFFIXES:
            owner[fam.name + suffix] = i
    values: list[dict[tuple, float]] = [{} for _ in families]
    for i, fam in enumerate(families):
        for s in fam.samples:
            if not s.name.endswith("_created"):
                values[i][_key(s.name, s.labels)] = float(s.value)
    for snapshot in remote:
        for name, labels, value in snapshot:
            i = owner.get(name)
            if i is not None:
                k = _key(name, labels)
                values[i][k] = values[i].get(k, 0.0) + float(value)
    for fam, vals in zip(families, values, strict=True):
        merged = Metric(fam.name, fam.documentation, fam.type, fam.unit)
        for (name, labels), value in _ordered(vals):
            merged.add_sample(name, dict(labels), value)
        yield merged


def _ordered(vals: dict[tuple, float]) -> list:
    """Samples grouped by label set with histogram buckets in `le` order (the text format expects it)."""

    def sort_key(item):
        (name, labels), _ = item
        rest = tuple(kv for kv in labels if kv[0] != "le")
        le = next((float(v) for k, v in labels if k == "le"), 0.0)
        return (rest, name.endswith("_bucket") is False, le, name)

    return sorted(vals.items(), key=sort_key)
