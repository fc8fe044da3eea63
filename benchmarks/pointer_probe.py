"""Can one attention head find the queried needle's byte from what a model's residual stream holds, and does the
position encoding stop it? A linear probe of the lookup's last step, on CPU in minutes.

The model's weights are frozen. For held-out lookup rows (niah_multikey with 2 and 4 needles, kv_retrieval; the
whole answer masked, as in the probe) the input of one layer's attention (after its norm) is recorded once. Then a
fresh head, only its query and key projections, is fitted to the pointer loss's target (each copying answer token
-> the context token holding its byte) under several position encodings: the model's RoPE, RoPE with a larger
base (LLaDA's 5e5), RoPE on half the head's dimensions (the other half matches content at any distance), and none.
It is fitted on training-split rows and scored on held-out-split rows. If a head without RoPE finds the needle and
one with the model's RoPE does not, the position encoding is what keeps the model from matching keys; if none
finds it, the layer's input does not say which key a token belongs to.

    python benchmarks/pointer_probe.py /path/to/model --layers 3,6
"""

from __future__ import annotations

import argparse
import random

import torch
from torch import Tensor
from torch.nn import functional as F

from pdllm.models.layers import Rotary, apply_rotary
from pdllm.models.loader import load_model
from pdllm.training.data import Batch, attention_mask, build_example, collate
from pdllm.training.objective import MaskedAttention, head_scores

ROWS = {"niah_multikey": (2, 4), "kv_retrieval": None, "niah_single": None}
ENCODINGS = ("rope", "rope5e5", "half", "none")


def batches(task: str, keys, split: str, rows: int, length: int, seed: int, per: int = 16) -> list[Batch]:
    rng = random.Random(f"pointer-probe:{seed}:{task}:{split}")
    built = [build_example(rng, length, False, {task: 1.0}, (256,), split=split, keys=keys) for _ in range(rows)]
    return [collate(built[i : i + per]) for i in range(0, rows, per)]


@torch.no_grad()
def layer_inputs(model, b: Batch, layers: tuple[int, ...], head0: bool = False) -> dict[int, Tensor]:
    """{layer: [B, T, H]} the normed input of each layer's attention, the whole answer masked; `head0`: instead
    head 0's output of each layer ([B, T, D]: what the match loss reads at the key layer)."""
    seen: dict[int, Tensor] = {}
    hooks = [
        model.layers[i].attn_norm.register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(i, out.detach()))
        for i in ([] if head0 else layers)
    ]
    noisy = torch.where(b.answer, torch.full_like(b.ids, model.spec.mask_token_id), b.ids)
    attention = MaskedAttention(attention_mask(b.seg, b.full), outputs=layers if head0 else ())
    model(noisy, b.pos, attention, logits_from=None)
    for h in hooks:
        h.remove()
    return attention.head0 if head0 else seen


class Head(torch.nn.Module):
    """Query and key projections of one head and a position encoding."""

    def __init__(self, hidden: int, dim: int, encoding: str, theta: float) -> None:
        super().__init__()
        self.q = torch.nn.Linear(hidden, dim, bias=False)
        self.k = torch.nn.Linear(hidden, dim, bias=False)
        rotated = dim // 2 if encoding == "half" else dim
        self.rotated = 0 if encoding == "none" else rotated
        self.rotary = Rotary(max(self.rotated, 2), 5e5 if encoding == "rope5e5" else theta)

    def qk(self, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """(q, k), each [B, 1, T, D] with the encoding applied: the shape objective.head_scores reads."""
        q, k = self.q(x)[:, None], self.k(x)[:, None]
        if self.rotated:
            cos, sin = self.rotary.cos_sin(pos, x.dtype)
            r = self.rotated
            q = torch.cat([apply_rotary(q[..., :r], cos, sin), q[..., r:]], -1)
            k = torch.cat([apply_rotary(k[..., :r], cos, sin), k[..., r:]], -1)
        return q, k


def masked_scores(head: Head, x: Tensor, b: Batch) -> Tensor:
    """[B, P, T] the fitted head's scores from each copying answer token, as the pointer loss sees them."""
    return head_scores(head.qk(x, b.pos), b.pointer_at, attention_mask(b.seg, b.full))


def accuracy(head: Head, data: list[tuple[Tensor, Batch]]) -> tuple[float, float]:
    """(share of copying tokens whose top score is their byte, share whose top score is a byte of their value)"""
    hit = needle = n = 0
    with torch.no_grad():
        for x, b in data:
            valid = b.pointer >= 0
            top = masked_scores(head, x, b).argmax(-1)
            hit += ((top == b.pointer) & valid).sum().item()
            in_value = (top[:, :, None] == b.pointer[:, None, :]).any(-1)
            needle += (in_value & valid).sum().item()
            n += valid.sum().item()
    return hit / max(n, 1), needle / max(n, 1)


def fit(head: Head, train: list[tuple[Tensor, Batch]], steps: int, lr: float) -> None:
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for step in range(steps):
        x, b = train[step % len(train)]
        s = masked_scores(head, x, b)
        loss = F.cross_entropy(s.reshape(-1, s.shape[-1]), b.pointer.reshape(-1), ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        opt.step()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--layers", default="3,6", help="layers whose attention input is probed")
    p.add_argument("--rows", type=int, default=128, help="training-split rows per task (held-out: a quarter)")
    p.add_argument("--length", type=int, default=500)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dim", type=int, help="the fitted head's width (default: the model's head_dim)")
    p.add_argument("--encodings", default=",".join(ENCODINGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head0", action="store_true", help="probe head 0's output of each layer, not its input")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model = load_model(args.model, device="cpu", dtype=torch.float32).model.eval()
    spec = model.spec
    layers = tuple(int(i) for i in args.layers.split(","))
    dim = args.dim or spec.head_dim
    print(f"{args.model}: {args.rows} training / {args.rows // 4} held-out rows per task, {args.length} tokens")
    print(f"fitted head: width {dim}, {args.steps} Adam steps at {args.lr}; model RoPE base {spec.rope_theta:g}")
    data = {}
    for task, keys in ROWS.items():
        for split, rows in (("train", args.rows), ("heldout", args.rows // 4)):
            for b in batches(task, keys, split, rows, args.length, args.seed):
                feats = layer_inputs(model, b, layers, args.head0)
                for layer in layers:
                    data.setdefault((layer, split, task), []).append((feats[layer], b))
    tasks = list(ROWS)
    print("byte / value: the top score on the copied byte / on any byte of the queried value (held-out rows)")
    print(f"{'layer':>5s} {'encoding':>9s} {'train':>11s} " + " ".join(f"{t:>13s}" for t in tasks))
    for layer in layers:
        train = [d for t in tasks for d in data[(layer, "train", t)]]
        random.Random(args.seed).shuffle(train)
        for encoding in args.encodings.split(","):
            head = Head(spec.head_dim if args.head0 else spec.hidden_size, dim, encoding, spec.rope_theta)
            fit(head, train, args.steps, args.lr)
            pair = lambda r: f"{r[0]:.2f} / {r[1]:.2f}"  # noqa: E731
            held = " ".join(f"{pair(accuracy(head, data[(layer, 'heldout', t)])):>13s}" for t in tasks)
            print(f"{layer:5d} {encoding:>9s} {pair(accuracy(head, train)):>11s} {held}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
