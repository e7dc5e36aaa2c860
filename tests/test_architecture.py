"""The import structure (docs/design.md, "Layout"): dependencies point one way and form no cycle.

    pipelines ──> streamrl, buffers          buffers ──> streamrl.types, .wire, .plugins only
    streamrl  ──> never pipelines            no module imports itself back through others

Every import counts, the ones inside functions too (a lazy import hides a cycle, it does not remove it).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("streamrl", "buffers", "pipelines")
# streamrl modules that still reach into buffers (the pre-Ray check that the buffer filter loads); the list may only
# shrink
STREAMRL_TO_BUFFERS = {"streamrl.config.preflight"}
BUFFERS_MAY_USE = {"streamrl.types", "streamrl.wire", "streamrl.plugins"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that `name` (a module or a name inside one) refers to."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{a.name}" for a in node.names] or [base]
            for t in targets:
                dep = _resolve(t, known)
                if dep and dep != mod and not mod.startswith(dep + "."):  # a package's own __init__ is no edge
                    graph[mod].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_dependencies_point_one_way():
    graph = import_graph()
    bad = []
    for mod, deps in graph.items():
        for d in deps:
            if mod.startswith("streamrl") and d.startswith("pipelines"):
                bad.append(f"{mod} -> {d}")
            if mod.startswith("buffers") and d.startswith("streamrl") and d not in BUFFERS_MAY_USE:
                bad.append(f"{mod} -> {d}")
            if mod.startswith("streamrl") and d.startswith("buffers") and mod not in STREAMRL_TO_BUFFERS:
                bad.append(f"{mod} -> {d}")
    assert bad == []


def test_graph_sees_top_level_lazy_and_relative_imports():
    g = import_graph()
    assert "streamrl.types" in g["streamrl.rollout.manager"]  # top level
    assert "buffers.queue" in g["pipelines.launch"]  # inside a function
    assert "streamrl.engine.scheduler" in g["streamrl.engine.actor"]  # relative


def test_weight_sync_and_engine_meet_only_in_the_weight_wire_format():
    bad = [f"{m} -> {d}" for m, deps in import_graph().items() for d in deps
           if (m.startswith("streamrl.sync") and d.startswith("streamrl.engine"))
           or (m.startswith("streamrl.engine") and d.startswith("streamrl.sync"))]
    assert bad == []  # both sides import streamrl.weights instead


def test_the_engine_server_never_imports_the_client_side():
    """engine/ (server side) and rollout/ (producers and clients) share helpers through small modules instead."""
    bad = [f"{m} -> {d}" for m, deps in import_graph().items() for d in deps
           if m.startswith("streamrl.engine") and d.startswith("streamrl.rollout")]
    assert bad == []


def test_fsdp_trainer_group_implements_the_backend_interface():
    import inspect

    from streamrl.train.backend import TrainerBackend
    from streamrl.train.group import TrainerGroup

    methods = [n for n, v in vars(TrainerBackend).items() if inspect.isfunction(v) and not n.startswith("_")]
    assert {"train_step", "stage_weights", "push_staged", "save_state", "load_state", "save_hf"} <= set(methods)
    for name in methods:
        want = list(inspect.signature(getattr(TrainerBackend, name)).parameters)
        assert list(inspect.signature(getattr(TrainerGroup, name)).parameters) == want, name


# Imports that stay inside functions, each for a reason: optional or slow dependencies used on one path (any
# module may import these lazily), Ray internals read at call time, the engine package's cheap PEP 562 re-exports.
# Everything else imports at the top.
OPTIONAL_PACKAGES = {"megatron", "liger_kernel", "sglang", "sglang_router", "wandb", "matplotlib"}
LAZY_IMPORTS_ALLOWED = {
    ("pipelines/launch.py", "ray._private"),  # the log forwarder has no public hook
    ("pipelines/launch.py", "ray._private.worker"),  # _global_node is read when called, not at import
    ("streamrl/engine/__init__.py", "streamrl.engine"),  # PEP 562 lazy re-exports keep the package cheap
    ("streamrl/train/backend.py", "streamrl.train.megatron.group"),  # megatron-core: only --train-backend megatron
}


def test_imports_sit_at_the_top_of_modules():
    """Outside `config/` (a fast `--help`) and the entry points, modules import at the top."""
    found = set()
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("streamrl/config/"):
                continue
            for fn in ast.walk(ast.parse(path.read_text(), rel)):
                if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(fn):
                    if isinstance(node, ast.Import):
                        found |= {(rel, a.name) for a in node.names}
                    elif isinstance(node, ast.ImportFrom):
                        base = "streamrl.engine" if node.level else node.module
                        found.add((rel, base))
    found = {(rel, mod) for rel, mod in found if mod.split(".")[0] not in OPTIONAL_PACKAGES}
    assert found <= LAZY_IMPORTS_ALLOWED, sorted(found - LAZY_IMPORTS_ALLOWED)
