"""deploy/config.example.yaml: documented option by option, and loadable by the cluster config class itself."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "config.example.yaml"


def test_every_option_is_documented_by_a_comment_above_it():
    lines = EXAMPLE.read_text().splitlines()
    keys = [i for i, line in enumerate(lines) if re.match(r"^[a-z_]+:", line)]
    assert len(keys) == len(yaml.safe_load(EXAMPLE.read_text())), "only flat top-level options are expected"
    for i in keys:
        j = i - 1
        while j >= 0 and re.match(r"^[a-z_]+:", lines[j]):  # options grouped under one comment block
            j -= 1
        assert j >= 0 and lines[j].startswith("# "), f"option {lines[i].split(':')[0]} has no comment above it"


def config_class():
    from pdllm.cluster.config import ClusterConfig

    return ClusterConfig


def test_example_loads_and_validates_through_the_config_class():
    cls = config_class()
    cfg = cls.from_yaml(str(EXAMPLE))
    cfg.validate()
    data = yaml.safe_load(EXAMPLE.read_text())
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(data) <= fields, f"the example sets options the class does not know: {sorted(set(data) - fields)}"
    assert fields <= set(data), f"options missing from the example: {sorted(fields - set(data))}"
    for key, value in data.items():
        got = getattr(cfg, key)
        got = dataclasses.asdict(got) if dataclasses.is_dataclass(got) else got
        assert got == value, f"{key}: loaded {got!r}, the file says {value!r}"
    from pdllm.cluster.common.limits import ClusterLimits

    limits = {f.name for f in dataclasses.fields(ClusterLimits)}
    assert set(data["limits"]) == limits, f"limits missing from the example: {sorted(limits - set(data['limits']))}"
