"""Regenerate the committed flag snapshots behind `--sglang-<flag>` / `--router-<flag>` from pinned releases.

    python scripts/update_passthrough_snapshot.py                       # the pins below
    python scripts/update_passthrough_snapshot.py --sglang-version 0.5.9 --router-version 0.3.2

For each package: when the pinned version is installed, its own parser is read (`ServerArgs.add_cli_args` /
`RouterArgs.add_cli_args` on a scratch parser, exactly what streamrl does at run time). Otherwise the release's
wheel is downloaded with `pip download --no-deps` (nothing is installed) and the `add_argument(...)` calls of its
`add_cli_args` are read statically with `ast`, which needs none of the package's (GPU) dependencies. Values that
cannot be read statically (a choice list computed at run time, a custom `type=` callable) degrade to "no choices"
and "string"; SGLang itself still validates them when the server starts.

Writes streamrl/config/sglang_server_args.json and streamrl/config/router_args.json.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import operator
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamrl.passthrough import KINDS, _choices, snapshot_path, specs_from_parser  # noqa: E402

PINS = {"sglang": "0.5.8", "router": "0.3.2"}
SOURCES = {  # kind -> (wheel member, class, function, names the f-strings use)
    "sglang": ("sglang/srt/server_args.py", "ServerArgs", "add_cli_args", {}),
    "router": ("sglang_router/router_args.py", "RouterArgs", "add_cli_args", {"prefix": ""}),
}
_UNRESOLVED = object()
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Pow: operator.pow}


class _Reader:
    """Evaluates the literal parts of `add_argument` calls: constants, module constants, `Cls.field` defaults."""

    def __init__(self, tree: ast.Module, cls_name: str, names: dict[str, Any]):
        self.names = dict(names)
        self.fields: dict[str, Any] = {}
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                self.names[node.targets[0].id] = self.eval(node.value)
            if isinstance(node, ast.ClassDef) and node.name == cls_name:
                for item in node.body:
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value:
                        self.fields[item.target.id] = self.eval(item.value)
        self.cls_name = cls_name

    def eval(self, node: ast.AST) -> Any:
        try:
            return ast.literal_eval(node)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
        if isinstance(node, ast.Name):
            return self.names.get(node.id, _UNRESOLVED)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == self.cls_name:
            return self.fields.get(node.attr, _UNRESOLVED)
        if isinstance(node, ast.JoinedStr):
            parts = []
            for v in node.values:
                if isinstance(v, ast.Constant):
                    parts.append(str(v.value))
                else:
                    val = self.eval(v.value)
                    parts.append("..." if val is _UNRESOLVED else str(val))
            return "".join(parts)
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            vals = [self.eval(e) for e in node.elts]
            return _UNRESOLVED if any(v is _UNRESOLVED for v in vals) else list(vals)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:  # 2**26, 512 * 1024 * 1024, [...] + [...]
            a, b = self.eval(node.left), self.eval(node.right)
            return _UNRESOLVED if _UNRESOLVED in (a, b) else _BINOPS[type(node.op)](a, b)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("list", "sorted"):
            vals = self.eval(node.args[0]) if node.args else []
            return _UNRESOLVED if vals is _UNRESOLVED else sorted(vals) if node.func.id == "sorted" else list(vals)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "field":
            for kw in node.keywords:  # dataclasses.field(default_factory=list/dict)
                if kw.arg == "default_factory" and isinstance(kw.value, ast.Name):
                    return {"list": [], "dict": {}}.get(kw.value.id, _UNRESOLVED)
                if kw.arg == "default":
                    return self.eval(kw.value)
        return _UNRESOLVED


def _type_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name) and node.id in ("int", "float", "str"):
        return node.id
    if isinstance(node, ast.Attribute) and node.attr == "loads":
        return "json"
    return "str"


def specs_from_source(source: str, cls_name: str, func: str, names: dict[str, Any]) -> list[dict[str, Any]]:
    """The flags declared by `cls_name.func`'s `*.add_argument(...)` calls, in the format of `specs_from_parser`."""
    tree = ast.parse(source)
    reader = _Reader(tree, cls_name, names)
    fn = next(n for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == cls_name
              for n in c.body if isinstance(n, ast.FunctionDef) and n.name == func)
    out = []
    for call in ast.walk(fn):
        is_call = isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
        if not (is_call and call.func.attr == "add_argument"):
            continue
        flags = [reader.eval(a) for a in call.args]
        flags = [f for f in flags if isinstance(f, str) and f.startswith("--")]
        if not flags:
            continue
        kw = {k.arg: k.value for k in call.keywords if k.arg}
        action = reader.eval(kw["action"]) if "action" in kw else "store"
        if isinstance(kw.get("action"), ast.Attribute) and kw["action"].attr == "BooleanOptionalAction":
            action = "boolean_optional"
        if action is _UNRESOLVED or action not in ("store", "store_true", "store_false", "append", "store_const",
                                                   "boolean_optional"):
            continue  # a custom action (deprecated aliases, LoRA path parsing): not passed through
        spec: dict[str, Any] = {"flags": flags, "dest": flags[0][2:].replace("-", "_"), "action": action}
        if "dest" in kw and isinstance(reader.eval(kw["dest"]), str):
            spec["dest"] = reader.eval(kw["dest"])
        default = reader.eval(kw["default"]) if "default" in kw else {"store_true": False, "store_false": True}.get(
            action)
        spec["default"] = None if default is _UNRESOLVED else default
        spec["type"] = _type_name(kw["type"]) if "type" in kw else ("str" if action in ("store", "append") else None)
        nargs = reader.eval(kw["nargs"]) if "nargs" in kw else None
        spec["nargs"] = None if nargs is _UNRESOLVED else nargs
        choices = reader.eval(kw["choices"]) if "choices" in kw else None
        spec["choices"] = None if choices is _UNRESOLVED else _choices(choices)
        const = reader.eval(kw["const"]) if "const" in kw else None
        spec["const"] = None if const is _UNRESOLVED else const
        help_text = reader.eval(kw["help"]) if "help" in kw else ""
        spec["help"] = "" if help_text is _UNRESOLVED else help_text
        out.append(json.loads(json.dumps(spec, default=str)))
    return out


def _download(package: str, version: str, member: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{package}=={version}", "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            return z.read(member).decode()


def snapshot(kind: str, version: str) -> dict[str, Any]:
    k = KINDS[kind]
    try:
        installed = importlib.metadata.version(k.package)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed == version:
        specs, method = specs_from_parser(k.scratch_parser()), "live"
    else:
        member, cls_name, func, names = SOURCES[kind]
        specs, method = specs_from_source(_download(k.package, version, member), cls_name, func, names), "ast"
    return {"package": k.package, "version": version, "method": method,
            "generated_by": "scripts/update_passthrough_snapshot.py", "args": specs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sglang-version", default=PINS["sglang"])
    p.add_argument("--router-version", default=PINS["router"])
    a = p.parse_args()
    for kind, version in (("sglang", a.sglang_version), ("router", a.router_version)):
        snap = snapshot(kind, version)
        snapshot_path(kind).write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
        print(f"{snapshot_path(kind).relative_to(ROOT)}: {len(snap['args'])} flags from {snap['package']}=={version} "
              f"({snap['method']})")


if __name__ == "__main__":
    main()
