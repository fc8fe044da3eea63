"""The supported dLLM families, found by a config's model_type."""

from __future__ import annotations

from types import ModuleType

from pdllm.models import dream, llada

FAMILIES: dict[str, ModuleType] = {"llada": llada, "dream": dream}


def family_module(model_type: str | None) -> ModuleType | None:
    return FAMILIES.get(str(model_type or "").lower())
