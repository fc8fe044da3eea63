"""Load a dLLM from a local Hugging Face layout directory (config.json, *.safetensors or a sharded index, tokenizer).

No hub access: every file comes from the directory. Every failure is a `CheckpointError` with a one-line cause.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from pdllm.errors import CheckpointError
from pdllm.models.registry import FAMILIES, family_module
from pdllm.models.spec import ModelSpec
from pdllm.models.transformer import DllmModel


@dataclass
class LoadedModel:
    model: DllmModel
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    spec: ModelSpec
    path: Path
    model_id: str  # content fingerprint: part of every chunk id, so KV of another model never matches


def read_config(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        return json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {exc}") from None


def spec_from_dir_config(cfg: dict, path: Path) -> ModelSpec:
    module = family_module(cfg.get("model_type"))
    if module is None:
        raise CheckpointError(
            f"unknown model family {cfg.get('model_type')!r} in {path}/config.json (model_type); "
            f"supported: {', '.join(m.MODEL_TYPE for m in FAMILIES.values())}"
        )
    try:
        return module.spec_from_config(cfg)
    except KeyError as exc:
        raise CheckpointError(f"{path}/config.json lacks field {exc.args[0]!r} needed by {module.MODEL_TYPE}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}/config.json is not a valid {module.MODEL_TYPE} config: {exc}") from None


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"{index} is corrupt: {exc}") from None
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors weights")
    return files


WHOLE_FILE_BYTES = 64 << 20  # weight files up to this size are hashed whole; larger ones by SAMPLED_BLOCKS blocks
SAMPLED_BLOCKS = 64
BLOCK_BYTES = 1 << 16


def fingerprint(path: Path, files: list[Path]) -> str:
    """The model's id: its config and the content of its weights, whatever directory holds them. Names and sizes
    alone are not enough: a retrained checkpoint of the same shape has both, and its chunk KV must never be served
    for the old one's (chunk ids carry this id). A file over WHOLE_FILE_BYTES is read at SAMPLED_BLOCKS evenly
    spaced blocks, its header included (4 MiB, not the gigabytes of an 8B model's shard): new weights change every
    block, so a sample tells them apart."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            if size <= WHOLE_FILE_BYTES:
                for block in iter(lambda: fh.read(BLOCK_BYTES), b""):  # 64 KiB at a time: no copy of the file
                    h.update(block)
                continue
            for i in range(SAMPLED_BLOCKS):
                fh.seek(i * (size - BLOCK_BYTES) // (SAMPLED_BLOCKS - 1))
                h.update(fh.read(BLOCK_BYTES))
    return h.hexdigest()[:16]


def load_weights(model: DllmModel, files: list[Path], device: torch.device, dtype: torch.dtype) -> None:
    """Copy checkpoint tensors into the model through the family's name table, checking names and shapes."""
    names = FAMILIES[model.spec.family].NAMES
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for ckpt_name in handle.keys():
                    target = names.to_module(ckpt_name)
                    if target is None or target not in params:
                        continue  # tensors we do not use (e.g. rotary caches) are skipped
                    tensor = handle.get_tensor(ckpt_name)
                    param = params[target]
                    if tuple(tensor.shape) != tuple(param.shape):
                        raise CheckpointError(
                            f"tensor {ckpt_name} in {file.name} has shape {tuple(tensor.shape)}, "
                            f"config.json implies {tuple(param.shape)}"
                        )
                    with torch.no_grad():
                        param.copy_(tensor.to(device=device, dtype=dtype))
                    loaded.add(target)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"cannot read weights file {file}: {exc}") from None
    tied = {"lm_head.weight"} if model.spec.tie_word_embeddings else set()
    missing = sorted(set(params) - loaded - tied)
    if missing:
        first = names.to_checkpoint(missing[0]) or missing[0]
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s), first: {first}")


def load_tokenizer(path: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # AutoTokenizer warns about our config's model_type, which it does not know
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        if (path / "tokenizer.json").is_file():  # e.g. Dream's tokenizer class lives in remote code
            return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
        raise CheckpointError(f"cannot load a tokenizer from {path}: {exc}") from None


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load model, tokenizer and spec from a local directory."""
    path = Path(path).expanduser()
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    cfg = read_config(path)
    spec = spec_from_dir_config(cfg, path)
    files = weight_files(path)
    tokenizer = load_tokenizer(path)
    spec = complete_special_tokens(spec, tokenizer)
    with torch.device("meta"):
        model = DllmModel(spec)
    model = model.to_empty(device=device).to(dtype)
    model.rotary = type(model.rotary)(spec.head_dim, spec.rope_theta).to(device)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    load_weights(model, files, device, dtype)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, path=path, model_id=fingerprint(path, files))


def complete_special_tokens(spec: ModelSpec, tokenizer) -> ModelSpec:
    """Fill BOS/EOS ids the config leaves out from the tokenizer (LLaDA's config names no BOS)."""
    bos = spec.bos_token_id if spec.bos_token_id is not None else getattr(tokenizer, "bos_token_id", None)
    eos = set(spec.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(int(tokenizer.eos_token_id))
    return replace(spec, bos_token_id=bos, eos_token_ids=tuple(sorted(eos)))
