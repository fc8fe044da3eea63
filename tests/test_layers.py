"""Imports go one way: a module may import its own layer and the layers below it, never one above. Every module of
the package is parsed (imports inside functions included, so a lazy import cannot hide an upward edge)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# where each package's files live (pyproject's package-dir)
SOURCES = {
    "pdllm": "pdllm",
    "pdllm.cluster": "cluster",
    "pdllm.prefill_node": "prefill_node",
    "pdllm.decode_node": "decode_node",
    "pdllm.kernels": "kernels",
    "pdllm.proto": "proto",
}
# The layers, lowest first; a module belongs to the layer of its longest listed prefix. README, Layout, shows it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "pdllm",
            "pdllm.errors",
            "pdllm.progress",
            "pdllm.devices",
            "pdllm.observability",
            "pdllm.proto",
            "pdllm.assets",
        ),
    ),
    ("kernels", ("pdllm.kernels",)),
    ("model", ("pdllm.models", "pdllm.sampler", "pdllm.prompt", "pdllm.context_tokens", "pdllm.tasks")),
    ("method", ("pdllm.method",)),
    ("engine", ("pdllm.decode_node", "pdllm.engine", "pdllm.evaluation", "pdllm.training")),
    ("cluster.common", ("pdllm.cluster.common",)),
    ("cluster.kv", ("pdllm.cluster.kv",)),
    ("nodes", ("pdllm.prefill_node", "pdllm.decode_node.actor")),
    ("cluster.router", ("pdllm.cluster.router",)),
    ("cluster.api", ("pdllm.cluster.api",)),
    ("cluster.batch", ("pdllm.cluster.batch",)),
    ("cluster", ("pdllm.cluster",)),  # runtime, bootstrap, config, the cluster backend
    ("client", ("pdllm.client", "pdllm.load_client", "pdllm.commands", "pdllm.cli")),
]
RANK = {prefix: i for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        rank = RANK.get(".".join(parts[:n]))
        if rank is not None:
            return rank
    raise KeyError(f"{module} is in no layer: add it to LAYERS")


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            name = ".".join((package, *rel))
            if name.endswith(("_pb2", "_pb2_grpc")):  # generated
                continue
            found[name] = path
    return found


def imported(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, module) of every pdllm import in the file, at any depth, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "pdllm"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "pdllm":
                continue
            # `from pdllm.cluster import runtime` imports the module pdllm.cluster.runtime
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return out


def resolve(target: str, known: dict[str, Path]) -> str:
    """The module an import names (the longest known prefix: `pkg.mod.Name` is `pkg.mod`)."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in known:
            return name
    return target


def upward_imports(known: dict[str, Path], only: set[str] | None = None) -> list[str]:
    """`file:line: module (layer) imports target (layer)` for each import of a higher layer (of `only` modules)."""
    bad = []
    for module, path in known.items():
        if only is not None and module not in only:
            continue
        mine = layer_of(module)
        for line, target in imported(module, path):
            theirs = layer_of(resolve(target, known))
            if theirs > mine:
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                bad.append(f"{where}:{line}: {module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    return bad


def test_every_module_is_found_and_in_a_layer():
    known = modules()
    # the check reads the real tree: the packages and a few modules each layer is known to hold
    for name in ("pdllm.cluster.runtime", "pdllm.cluster.kv.chunk_index", "pdllm.decode_node.actor",
                 "pdllm.cluster.router.router", "pdllm.cluster.api.server", "pdllm.kernels.dispatch"):  # fmt: skip
        assert name in known, name
    assert len(known) > 100
    for module in known:
        layer_of(module)


def test_no_layer_imports_a_higher_one():
    bad = upward_imports(modules())
    assert not bad, "imports against the layer order (tests/test_layers.py, LAYERS):\n" + "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path):
    """A kv module that imports the router (inside a function) is reported with its file and line."""
    fake = tmp_path / "chunk_thing.py"
    fake.write_text("def f():\n    from pdllm.cluster.router.router import Router\n    return Router\n")
    known = modules()
    known["pdllm.cluster.kv.chunk_thing"] = fake
    bad = upward_imports(known, only={"pdllm.cluster.kv.chunk_thing"})
    assert bad == [f"{fake}:2: pdllm.cluster.kv.chunk_thing (cluster.kv) imports pdllm.cluster.router.router.Router "
                   "(cluster.router)"]  # fmt: skip


@pytest.mark.parametrize(
    "module, layer",
    [
        ("pdllm.decode_node.engine", "engine"),
        ("pdllm.decode_node.actor", "nodes"),
        ("pdllm.cluster.runtime", "cluster"),
        ("pdllm.cluster.kv.chunk_store", "cluster.kv"),
        ("pdllm.commands.serve", "client"),
    ],
)
def test_longest_prefix_decides_the_layer(module, layer):
    assert LAYERS[layer_of(module)][0] == layer


def import_cycles(known: dict[str, Path]) -> list[list[str]]:
    """Groups of modules that import each other, directly or around a loop (at any depth, so within one layer too)."""
    graph = {m: ({resolve(t, known) for _, t in imported(m, p)} & set(known)) - {m} for m, p in known.items()}
    order, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        order[v] = low[v] = len(order)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in order:
            visit(v)
    return cycles


def test_no_import_cycles():
    cycles = import_cycles(modules())
    assert not cycles, "modules that import each other:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_sees_a_loop(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import pdllm.training.loop_b\n")
    b.write_text("def f():\n    from pdllm.training import loop_a\n")
    known = {**modules(), "pdllm.training.loop_a": a, "pdllm.training.loop_b": b}
    assert ["pdllm.training.loop_a", "pdllm.training.loop_b"] in import_cycles(known)
