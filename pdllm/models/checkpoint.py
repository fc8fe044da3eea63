"""Write a model in its family's Hugging Face layout (config.json + safetensors, sharded when asked).

Used to make test checkpoints and the bundled model, so the loader is exercised on exactly what it reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pdllm.models.registry import FAMILIES
from pdllm.models.transformer import DllmModel


def checkpoint_state(model: DllmModel) -> dict[str, torch.Tensor]:
    names = FAMILIES[model.spec.family].NAMES
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.spec.tie_word_embeddings:
            continue
        ckpt = names.to_checkpoint(name)
        if ckpt is not None:
            out[ckpt] = tensor.detach().contiguous().cpu()
    return out


def save_checkpoint(model: DllmModel, out_dir: str | Path, shards: int = 1) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    family = FAMILIES[model.spec.family]
    (out_dir / "config.json").write_text(json.dumps(family.config_from_spec(model.spec), indent=2))
    state = checkpoint_state(model)
    if shards <= 1:
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return out_dir
    names = sorted(state)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out_dir
