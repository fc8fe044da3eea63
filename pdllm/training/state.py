"""Save and resume training across short device calls: small files (each under 15 MiB), few of them.

Model weights stay float32; AdamW moments are kept in bfloat16 on disk (enough to resume smoothly). Tensors are
packed greedily into `train-state-NNNNN.safetensors` files; `state.json` holds the step, the config and the log.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MAX_FILE_BYTES = 15 * 2**20


def save_state(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v.detach().float().cpu() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    tensors[f"opt.{key}.{names[id(p)]}"] = st[key].detach().to(torch.bfloat16).cpu()
    for old in out.glob("train-state-*.safetensors"):
        old.unlink()
    shard: dict[str, torch.Tensor] = {}
    size, n = 0, 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        b = t.numel() * t.element_size()
        if shard and size + b > MAX_FILE_BYTES:
            save_file(shard, str(out / f"train-state-{n:05d}.safetensors"))
            shard, size, n = {}, 0, n + 1
        shard[name] = t
        size += b
    save_file(shard, str(out / f"train-state-{n:05d}.safetensors"))
    (out / "state.json").write_text(json.dumps(meta, indent=1))


def load_state(src: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("train-state-*.safetensors")):
        tensors.update(load_file(str(f)))
    dev = next(model.parameters()).device
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    missing = sorted(set(model.state_dict()) - set(weights))
    if missing:
        raise ValueError(f"training state in {src} lacks {len(missing)} model tensor(s), first: {missing[0]}")
    model.load_state_dict(weights)
    params = dict(model.named_parameters())
    step = json.loads((src / "state.json").read_text()).get("step", 0)
    for name, p in params.items():
        if f"opt.exp_avg.{name}" in tensors and f"opt.exp_avg_sq.{name}" in tensors:  # a lost shard: fresh moments
            opt.state[p] = {
                "step": torch.tensor(float(step), device=dev),  # the fused step keeps it there
                "exp_avg": tensors[f"opt.exp_avg.{name}"].to(dev, torch.float32),
                "exp_avg_sq": tensors[f"opt.exp_avg_sq.{name}"].to(dev, torch.float32),
            }
    return json.loads((src / "state.json").read_text())
