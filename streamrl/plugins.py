"""Load user plug-ins named on the command line (every `--*-path` flag goes through `load_function`).

A spec is one of:
  * a built-in name (`pop_first`), looked up in the caller's `builtins` dict;
  * `package.module:function` (imported with importlib);
  * `path/to/file.py:function` (the file is imported by path; relative paths resolve against the cwd);
  * `package.module.function`, slime's dotted form, so that slime flag values keep working.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType

from ray import cloudpickle


def _choices(builtins: dict[str, Callable] | None) -> str:
    names = ", ".join(sorted(builtins)) if builtins else "(none)"
    return f"built-in choices: {names}; or 'package.module:function' or 'path/to/file.py:function'"


def _import_file(path: str, what: str, spec: str) -> ModuleType:
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{what} {spec!r}: file {path} does not exist")
    # One module per file (keyed by its absolute path): loading the same spec twice reuses it.
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"streamrl_plugin_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    mspec = importlib.util.spec_from_file_location(name, path)
    if mspec is None or mspec.loader is None:
        raise ValueError(f"{what} {spec!r}: cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module  # dataclasses and pickle look the module up by name while it executes
    try:
        mspec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    try:  # The module is not importable by name elsewhere: make Ray ship its functions by value.

        cloudpickle.register_pickle_by_value(module)
    except Exception:  # noqa: BLE001 - ray missing or too old: in-process use still works
        pass
    return module


def _import_module(modname: str, what: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        # Only translate "this module does not exist"; a missing import *inside* the plug-in keeps its traceback.
        if e.name and (modname == e.name or modname.startswith(e.name + ".")):
            raise ValueError(f"{what} {spec!r}: module {modname!r} not found") from e
        raise


def _attr(module: ModuleType, fname: str, what: str, spec: str, where: str) -> Callable:
    if not hasattr(module, fname):
        raise ValueError(f"{what} {spec!r}: {where} has no function {fname!r}")
    fn = getattr(module, fname)
    if not callable(fn):
        raise ValueError(f"{what} {spec!r}: {where} attribute {fname!r} is not callable")
    return fn


def load_function(spec: str, builtins: dict[str, Callable] | None = None, what: str = "plug-in") -> Callable:
    """Resolve `spec` to a callable: a built-in name, `module.path:function`, or `path/to/file.py:function`.

    Raises ValueError naming `what`, the spec and the built-in choices when the spec has none of these forms, and
    naming the missing piece when the module, the file or the function does not exist.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{what}: empty spec; {_choices(builtins)}")
    spec = spec.strip()
    if builtins and spec in builtins:
        return builtins[spec]
    if ":" in spec:
        left, fname = spec.rsplit(":", 1)
        if not left or not fname:
            raise ValueError(f"{what} {spec!r}: expected 'module:function' or 'file.py:function'; {_choices(builtins)}")
        if left.endswith(".py") or os.sep in left or "/" in left:
            return _attr(_import_file(left, what, spec), fname, what, spec, f"file {left}")
        return _attr(_import_module(left, what, spec), fname, what, spec, f"module {left!r}")
    if "." in spec and not spec.endswith(".py"):
        # slime's dotted form `pkg.module.function`.
        modname, fname = spec.rsplit(".", 1)
        return _attr(_import_module(modname, what, spec), fname, what, spec, f"module {modname!r}")
    raise ValueError(f"unknown {what} {spec!r}; {_choices(builtins)}")
