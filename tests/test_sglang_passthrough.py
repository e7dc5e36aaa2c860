"""--sglang-<flag> / --router-<flag>: built from the committed snapshots (or the installed package), validated."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from streamrl import passthrough as pt
from streamrl.config import ConfigError, build_parser, default_args, parse_args

ROOT = Path(__file__).resolve().parents[1]


def options():
    return {s for a in build_parser()._actions for s in a.option_strings}


def test_every_snapshot_flag_is_accepted_with_its_prefix():
    opts = options()
    for kind in ("sglang", "router"):
        snap = json.loads(pt.snapshot_path(kind).read_text())
        assert len(snap["args"]) > (300 if kind == "sglang" else 80)
        included = pt._included(kind)
        missing = [n for s in included for n in pt.option_names(kind, s) if n not in opts]
        assert not missing, missing[:5]


def test_slime_owned_flags_are_skipped_and_streamrl_flags_win():
    opts = options()
    for flag in ("--sglang-model-path", "--sglang-tp-size", "--sglang-tensor-parallel-size", "--sglang-port",
                 "--sglang-nccl-port", "--router-host", "--router-port", "--router-worker-urls"):
        assert flag not in opts
    # streamrl's own --sglang-* flags (slime's) are not SGLang server flags
    for flag in ("--sglang-server-concurrency", "--sglang-router-ip", "--sglang-router-port"):
        assert flag in opts


def test_values_types_aliases_and_forwarding():
    a = parse_args(["--rollout-engine", "sglang", "--sglang-mem-fraction-static", "0.7", "--sglang-dp-size", "2",
                    "--sglang-cuda-graph-bs", "1", "2", "4", "--sglang-enable-metrics", "--router-policy",
                    "round_robin"])
    assert a.sglang_mem_fraction_static == 0.7 and a.sglang_data_parallel_size == 2  # alias of --sglang-dp-size
    cli = pt.to_cli("sglang", a)
    assert len(cli) == 9 and all(p in " ".join(cli) for p in (
        "--mem-fraction-static 0.7", "--data-parallel-size 2", "--cuda-graph-bs 1 2 4", "--enable-metrics"))
    assert pt.to_cli("router", a) == ["--policy", "round_robin"]
    d = default_args()
    assert d.sglang_log_level == "info" and d.router_policy == "cache_aware"  # SGLang's defaults, readable by plug-ins
    assert pt.to_cli("sglang", d) == [] and pt.to_cli("router", d, defaults={"log_level": "warn"}) == \
        ["--log-level", "warn"]


@pytest.mark.parametrize("argv", [["--sglang-mem-fraction-static", "lots"], ["--router-policy", "fastest"],
                                  ["--sglang-load-format", "nope"]])
def test_bad_values_are_rejected_by_argparse(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--rollout-engine", "sglang", *argv])
    assert "invalid" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, flag", [
    ({"sglang_enable_metrics": True}, "--sglang-enable-metrics"),  # embedded engine
    ({"router_policy": "random"}, "--use-router"),
    ({"rollout_engine": "sglang", "sglang_router_ip": "10.0.0.1"}, "--sglang-router-port"),
    ({"rollout_engine": "sglang", "sglang_router_ip": "10.0.0.1", "sglang_router_port": 3000,
      "router_policy": "random"}, "--router-policy"),
])
def test_passthrough_validation_names_the_flag(overrides, flag):
    with pytest.raises(ConfigError, match=flag):
        default_args(**overrides)


def test_flags_the_embedded_engine_honours():
    """--sglang-mem-fraction-static, --sglang-max-prefill-tokens and --sglang-num-continuous-decode-steps work
    with the embedded engine too."""
    a = default_args(sglang_mem_fraction_static=0.5, sglang_max_prefill_tokens=4096,
                     sglang_num_continuous_decode_steps=4)
    assert a.rollout_engine == "embedded" and a.sglang_mem_fraction_static == 0.5
    assert a.sglang_max_prefill_tokens == 4096 and a.sglang_num_continuous_decode_steps == 4


def test_router_mode():
    assert default_args().router_mode == "none"
    assert default_args(use_router=True).router_mode == "local"
    assert default_args(rollout_engine="sglang").router_mode == "local"
    assert default_args(rollout_engine="sglang", sglang_router_ip="h", sglang_router_port=1).router_mode == "external"


def test_router_snapshot_matches_the_installed_router():
    """The pinned router is installed here: its live parser must give exactly the committed snapshot."""
    snap = json.loads(pt.snapshot_path("router").read_text())
    try:
        from importlib.metadata import version

        installed = version("sglang-router")
    except Exception:
        pytest.skip("sglang-router not installed")
    if installed != snap["version"]:
        pytest.skip(f"installed sglang-router {installed} != snapshot {snap['version']}")
    assert pt.specs_from_parser(pt.KINDS["router"].scratch_parser()) == snap["args"]


def test_static_reader_agrees_with_the_live_parser():
    """The snapshot script's `ast` path (used for SGLang, which cannot be installed here) read on the installed
    router's source gives the same flags, dests, actions and defaults as its live parser."""
    pytest.importorskip("sglang_router")
    import sglang_router.router_args as ra

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from update_passthrough_snapshot import specs_from_source
    finally:
        sys.path.pop(0)
    static = {s["dest"]: s for s in specs_from_source(Path(ra.__file__).read_text(), "RouterArgs", "add_cli_args",
                                                      {"prefix": ""})}
    live = {s["dest"]: s for s in pt.specs_from_parser(pt.KINDS["router"].scratch_parser())}
    assert set(live) <= set(static)
    unresolved = 0
    for dest, s in live.items():
        assert (static[dest]["flags"], static[dest]["action"]) == (s["flags"], s["action"]), dest
        if s["action"] == "store" and s["default"] is not None:
            if static[dest]["default"] is None:  # computed at run time (e.g. from an env var): left to SGLang
                unresolved += 1
            else:
                assert static[dest]["default"] == s["default"], dest
    assert unresolved <= 10


def test_installed_source_is_read_and_cached(tmp_path, monkeypatch):
    pytest.importorskip("sglang_router")
    monkeypatch.setenv("STREAMRL_PASSTHROUGH_SOURCE", "installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    pt.load_specs.cache_clear()
    try:
        monkeypatch.setattr(pt, "_installed_version", lambda pkg: "9.9.9" if pkg == "sglang-router" else None)
        got = pt.load_specs("router")
        assert got["source"] == "installed sglang-router==9.9.9"
        assert (tmp_path / "streamrl" / "passthrough" / "sglang-router-9.9.9.json").is_file()
        assert pt.load_specs("sglang")["source"].startswith("snapshot of sglang==")  # not installed: snapshot
    finally:
        pt.load_specs.cache_clear()


def _help(flag):
    code = (f"import sys, runpy; sys.argv=['train_async.py','{flag}']\n"
            "try:\n    runpy.run_path('train_async.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', [m for m in ('sglang', 'sglang_router', 'torch', 'ray') if m in sys.modules])")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout


def test_help_lists_passthrough_flags_without_importing_them():
    """--help-sglang lists the passthrough (~1400 lines); --help only streamrl's and slime's flags (~800)."""
    out = _help("--help-sglang")
    assert "--sglang-mem-fraction-static" in out and "--router-policy" in out and "HEAVY []" in out
    assert "--update-weights-interval" not in out
    out = _help("--help")
    assert "--sglang-mem-fraction-static" not in out and "--router-policy" not in out and "HEAVY []" in out
    assert "--update-weights-interval" in out and "--help-sglang" in out and len(out.splitlines()) < 1000
    assert parse_args(["--rollout-engine", "sglang", "--sglang-mem-fraction-static", "0.5"]) \
        .sglang_mem_fraction_static == 0.5  # hidden from --help, still accepted
