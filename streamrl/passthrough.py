"""Passthrough flags: every SGLang server flag as `--sglang-<flag>`, every sglang-router flag as `--router-<flag>`.

Where the list comes from (cheapest first; `--help` must stay instant and work on a CPU machine without SGLang):
  1. the committed snapshot (`sglang_server_args.json`, `router_args.json`, written by
     `scripts/update_passthrough_snapshot.py` from pinned releases) when the package is not installed, or is
     installed at the snapshot's version (checked with `importlib.metadata`: no import);
  2. otherwise the installed package's own parser (`ServerArgs.add_cli_args` / `RouterArgs.add_cli_args` called on a
     scratch parser, then read back), cached per version under `~/.cache/streamrl/passthrough/` because importing
     SGLang takes seconds. `STREAMRL_PASSTHROUGH_SOURCE=snapshot|installed` forces one source.

The flags are added by a prefix loop over plain specs (no monkeypatching of argparse). Values keep SGLang's defaults,
so plug-ins can read `args.sglang_mem_fraction_static`; only values that differ from the default are forwarded
(`to_cli`). Flags that streamrl owns are skipped, as in slime (the model path, tp size =
`--rollout-num-gpus-per-engine`, host/port, ...). A streamrl flag of the same name always wins.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_HERE = Path(__file__).parent / "config"  # the committed snapshots sit with the flags

# slime's list (slime/backends/sglang_utils/arguments.py) plus `host`: streamrl sets these itself.
SGLANG_SKIP = frozenset({
    "model_path", "config", "trust_remote_code", "random_seed", "enable_memory_saver", "tp_size", "port", "host",
    "tensor_parallel_size", "nnodes", "node_rank", "dist_init_addr", "gpu_id_step", "base_gpu_id", "nccl_port",
    "skip_server_warmup", "enable_return_routed_experts",
})
ROUTER_SKIP = frozenset({"host", "port", "worker_urls", "help"})


def _sglang_scratch_parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(add_help=False)
    ServerArgs.add_cli_args(parser)
    return parser


def _router_scratch_parser() -> argparse.ArgumentParser:
    from sglang_router.router_args import RouterArgs

    parser = argparse.ArgumentParser(add_help=False)
    RouterArgs.add_cli_args(parser, use_router_prefix=False, exclude_host_port=True)
    return parser


@dataclass(frozen=True)
class Kind:
    name: str  # "sglang" | "router": also the flag prefix
    package: str  # distribution name for importlib.metadata
    snapshot: str
    skip: frozenset[str]
    scratch_parser: Callable[[], argparse.ArgumentParser]
    title: str


KINDS = {
    "sglang": Kind("sglang", "sglang", "sglang_server_args.json", SGLANG_SKIP, _sglang_scratch_parser,
                   "SGLang server flags, passed through as --sglang-<flag> (with --rollout-engine sglang)"),
    "router": Kind("router", "sglang-router", "router_args.json", ROUTER_SKIP, _router_scratch_parser,
                   "sglang-router flags, passed through as --router-<flag> (when streamrl starts the router)"),
}

_ACTIONS = {
    argparse._StoreAction: "store", argparse._StoreTrueAction: "store_true",
    argparse._StoreFalseAction: "store_false", argparse._AppendAction: "append",
    argparse._StoreConstAction: "store_const", argparse.BooleanOptionalAction: "boolean_optional",
}
_TYPES: dict[str | None, Callable | None] = {"int": int, "float": float, "str": str, "json": json.loads, None: None}


def _plain(value: Any) -> Any:
    """JSON-safe version of a default or choice (sets sorted, unknown objects as strings)."""
    if isinstance(value, set | frozenset):
        value = sorted(value, key=str)
    return json.loads(json.dumps(value, default=str))


def _choices(choices: Any) -> list | None:
    """Choices as a list; strings sorted (some come from hash sets: a stable snapshot needs a stable order)."""
    if choices is None:
        return None
    out = _plain(list(choices))
    return sorted(out) if all(isinstance(c, str) for c in out) else out


def specs_from_parser(parser: argparse.ArgumentParser) -> list[dict[str, Any]]:
    """Plain, JSON-serialisable specs of a parser's long options (the snapshot format)."""
    out = []
    for act in parser._actions:
        flags = [s for s in act.option_strings if s.startswith("--")]
        kind = _ACTIONS.get(type(act))
        if not flags or kind is None:  # help, custom actions (deprecated aliases, LoRA paths): not passed through
            continue
        typ = act.type
        type_name = {int: "int", float: "float", str: "str", json.loads: "json"}.get(typ)
        type_name = type_name or (None if typ is None else "str")  # custom callables: SGLang validates them
        if kind in ("store", "append") and type_name is None:
            type_name = "str"
        default = None if act.default is argparse.SUPPRESS else act.default
        out.append({"flags": flags, "dest": act.dest, "action": kind, "type": type_name, "nargs": act.nargs,
                    "default": _plain(default), "const": _plain(act.const),
                    "choices": _choices(act.choices), "help": act.help or ""})
    return out


def snapshot_path(kind: str) -> Path:
    return _HERE / KINDS[kind].snapshot


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamrl" / "passthrough"


@functools.cache
def load_specs(kind: str) -> dict[str, Any]:
    """{"package", "version", "source", "args": [spec, ...]} for `kind` ("sglang" or "router")."""
    k = KINDS[kind]
    snap = json.loads(snapshot_path(kind).read_text())
    mode = os.environ.get("STREAMRL_PASSTHROUGH_SOURCE", "auto")
    installed = _installed_version(k.package)
    if mode == "snapshot" or installed is None or (mode == "auto" and installed == snap["version"]):
        return {**snap, "source": f"snapshot of {k.package}=={snap['version']}"}
    cache = _cache_dir() / f"{k.package}-{installed}.json"
    if cache.is_file():
        specs = json.loads(cache.read_text())
    else:  # importing SGLang is slow: read its parser once per installed version
        specs = specs_from_parser(k.scratch_parser())
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(specs))
    return {"package": k.package, "version": installed, "source": f"installed {k.package}=={installed}",
            "args": specs}


def _included(kind: str) -> list[dict[str, Any]]:
    k = KINDS[kind]
    # Skipped by dest or by any alias (`--tp-size` is an alias of `--tensor-parallel-size`), as slime does.
    return [s for s in load_specs(kind)["args"]
            if s["dest"] not in k.skip and not any(f[2:].replace("-", "_") in k.skip for f in s["flags"])]


def option_names(kind: str, spec: dict[str, Any]) -> list[str]:
    """Every long alias, prefixed: `--dp-size` -> `--sglang-dp-size` (slime prefixes all of them too)."""
    return [f"--{kind}-{f[2:]}" for f in spec["flags"]]


def dest_name(kind: str, spec: dict[str, Any]) -> str:
    return f"{kind}_{spec['dest']}"


def add_passthrough_args(parser: argparse.ArgumentParser) -> None:
    """Add `--sglang-*` and `--router-*` to `parser`, one argument group each, skipping names streamrl owns."""
    owned = {s for a in parser._actions for s in a.option_strings}
    owned_dests = {a.dest for a in parser._actions}
    for kind, k in KINDS.items():
        group = parser.add_argument_group(kind, k.title + f"; list from {load_specs(kind)['source']}")
        for spec in _included(kind):
            names, dest = option_names(kind, spec), dest_name(kind, spec)
            if owned.intersection(names) or dest in owned_dests:
                continue
            owned.update(names)
            owned_dests.add(dest)
            kw: dict[str, Any] = {"dest": dest, "help": (spec.get("help") or "").replace("%", "%%")}
            action = spec["action"]
            if action in ("store_true", "store_false"):
                kw.update(action=action, default=spec["default"])
            elif action == "boolean_optional":
                kw.update(action=argparse.BooleanOptionalAction, default=spec["default"])
            elif action == "store_const":
                kw.update(action="store_const", const=spec["const"], default=spec["default"])
            else:
                kw.update(action=action, type=_TYPES[spec["type"]], default=spec["default"])
                if spec["nargs"] is not None:
                    kw["nargs"] = spec["nargs"]
                if spec["choices"] is not None and spec["type"] != "json":
                    kw["choices"] = spec["choices"]
            group.add_argument(*names, **kw)


def set_values(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """{original dest: value} of the passthrough flags of `kind` whose value differs from the default."""
    out = {}
    for spec in _included(kind):
        dest = dest_name(kind, spec)
        if hasattr(args, dest) and getattr(args, dest) != spec["default"]:
            out[spec["dest"]] = getattr(args, dest)
    return out


def to_cli(kind: str, args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> list[str]:
    """Command-line tokens (original flag names) for the passthrough values of `kind` that were changed.

    `defaults` ({dest: value}) are streamrl's own choices, forwarded unless the user set that flag.
    """
    return cli_tokens(kind, {**(defaults or {}), **set_values(kind, args)})


def cli_tokens(kind: str, values: dict[str, Any]) -> list[str]:
    """`{dest: value}` -> tokens such as `["--mem-fraction-static", "0.7", "--enable-lora"]`."""
    specs = {s["dest"]: s for s in load_specs(kind)["args"]}
    out: list[str] = []
    for dest, value in values.items():
        if dest not in specs:
            raise ValueError(f"{load_specs(kind)['source']} has no flag with dest {dest!r}")
        spec, flag = specs[dest], specs[dest]["flags"][0]
        action = spec["action"]
        if action in ("store_true", "store_false", "store_const"):
            on = {"store_true": bool(value), "store_false": value is False}.get(action, value == spec["const"])
            out += [flag] if on else []
        elif action == "boolean_optional":
            out.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            continue
        elif action == "append":
            for item in value:
                out += [flag, *map(_cli_value, item if isinstance(item, list) else [item])]
        elif isinstance(value, list) and spec["nargs"] not in (None, "?"):
            out += [flag, *map(_cli_value, value)]
        else:
            out += [flag, _cli_value(value)]
    return out


def _cli_value(v: Any) -> str:
    if isinstance(v, dict | list):
        return json.dumps(v)
    return str(v)
