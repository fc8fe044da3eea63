"""Checkpoint tensor names <-> our module names, from one table per family (no if-chains)."""

from __future__ import annotations

import re
from collections.abc import Iterable


class NameMap:
    """Maps names through (checkpoint template, module template) pairs; '{i}' stands for a layer index."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.pairs = list(pairs)
        self._to_module = [(self._regex(ckpt), mod) for ckpt, mod in self.pairs]
        self._to_ckpt = [(self._regex(mod), ckpt) for ckpt, mod in self.pairs]

    @staticmethod
    def _regex(template: str) -> re.Pattern[str]:
        return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")

    @staticmethod
    def _apply(table: list[tuple[re.Pattern[str], str]], name: str) -> str | None:
        for pattern, target in table:
            m = pattern.match(name)
            if m:
                return target.replace("{i}", m.group("i")) if "{i}" in target else target
        return None

    def to_module(self, checkpoint_name: str) -> str | None:
        return self._apply(self._to_module, checkpoint_name)

    def to_checkpoint(self, module_name: str) -> str | None:
        return self._apply(self._to_ckpt, module_name)
