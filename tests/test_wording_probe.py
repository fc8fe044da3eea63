"""benchmarks/wording_probe.py: every sample's needles take the template probed, and the held-out set is restored."""

from __future__ import annotations

from benchmark_scripts import load_benchmark

from pdllm.tasks import facts
from pdllm.tasks.facts import HELDOUT_CORES


def test_each_template_is_scored_on_samples_worded_only_by_it(tiny_llada, monkeypatch):
    probe = load_benchmark("wording_probe")
    seen = []
    make = facts.facts

    def spy(*args, **kwargs):
        sample = make(*args, **kwargs)
        seen.append((facts.HELDOUT_CORES, sample.meta["needles"]))
        return sample

    monkeypatch.setattr(facts, "facts", spy)
    templates = ("{v} sits in drawer {s}.", "the {s} is {v}.")
    rows = list(probe.probe(str(tiny_llada), templates, (700,), 2, "cpu"))
    assert [r[0] for r in rows] == list(templates)
    assert all(set(cells) == {700} and cells[700][1] == 2 for _, cells, _, _ in rows)
    assert len(seen) == 4 and [cores for cores, _ in seen] == [templates[:1]] * 2 + [templates[1:]] * 2
    for (template,), needles in seen:  # every needle, the queried one and each distractor, in the probed template
        assert all(facts.template_pattern(template).search(n) for n in needles)
    assert facts.HELDOUT_CORES == HELDOUT_CORES
