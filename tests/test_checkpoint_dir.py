"""Checkpoint directory hygiene: a save killed mid-write leaves the previous checkpoint loadable and `latest` never
names a partial one; the next save removes the leftovers; `--keep-latest-k` prunes; files are fsynced before
`latest` moves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.checkpoint import latest_meta
from pipelines.checkpoint_dir import clean_staging, commit_dir, latest_dir, prune, staging_dir
from streamrl.config import ConfigError, default_args


def _save(root: Path, step: int, keep: int = 0, payload: bytes = b"") -> Path:
    tmp = staging_dir(root, step)
    (tmp / "trainer.pt").write_bytes(payload or f"weights {step}".encode())
    (tmp / "meta.json").write_text(json.dumps({"step": step}))
    return commit_dir(root, step, tmp, keep_latest_k=keep)


def _visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# A save in a child process that stops mid-write (half of a big file written, no meta.json yet) and waits to be
# killed: the state a SIGKILL or an OOM kill leaves behind.
_KILLED_WRITER = """
import os, sys
from pathlib import Path
from pipelines.checkpoint_dir import staging_dir
tmp = staging_dir(sys.argv[1], int(sys.argv[2]))
with open(tmp / "trainer.pt", "wb") as f:
    f.write(b"x" * (1 << 20))
    f.flush()
    print(tmp, flush=True)
    sys.stdin.read()  # blocks until killed
"""


def test_a_save_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    _save(root, 2)
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(root), "4"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        staged = Path(child.stdout.readline().strip())
        assert staged.is_dir() and (staged / "trainer.pt").stat().st_size == 1 << 20
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    # `latest` still names the complete step 2, which loads
    assert latest_dir(root) == root / "step_2"
    assert latest_meta(str(root))["step"] == 2
    assert (root / "step_2" / "trainer.pt").read_bytes() == b"weights 2"
    assert _visible(root) == [staged.name, "latest", "step_2"]
    # the next save removes the half-written staging dir
    _save(root, 4)
    assert _visible(root) == ["latest", "step_2", "step_4"]
    assert latest_meta(str(root))["step"] == 4


def test_an_exception_mid_commit_never_moves_latest(tmp_path, monkeypatch):
    """A failure while making the new checkpoint durable (here: fsync raising on its second file) leaves `latest`
    on the previous checkpoint, and the next save cleans up."""
    import pipelines.checkpoint_dir as cd

    root = tmp_path / "ckpt"
    _save(root, 2)
    tmp = staging_dir(root, 4)
    for name in ("trainer.pt", "buffer.msgpack", "meta.json"):
        (tmp / name).write_bytes(b"new")
    real, calls = cd._fsync, []

    def failing(path):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(5, "Input/output error", str(path))
        real(path)

    monkeypatch.setattr(cd, "_fsync", failing)
    with pytest.raises(OSError, match="Input/output error"):
        commit_dir(root, 4, tmp)
    monkeypatch.setattr(cd, "_fsync", real)
    assert latest_dir(root) == root / "step_2" and not (root / "step_4").exists()
    _save(root, 4)
    assert _visible(root) == ["latest", "step_2", "step_4"]


def test_files_and_directories_are_fsynced_before_latest_moves(tmp_path, monkeypatch):
    import pipelines.checkpoint_dir as cd

    root = tmp_path / "ckpt"
    _save(root, 2)
    events: list[str] = []
    real_fsync, real_write = cd._fsync, cd.atomic_write
    monkeypatch.setattr(cd, "_fsync", lambda p: (events.append(f"fsync {p.relative_to(root)}"), real_fsync(p)))
    monkeypatch.setattr(cd, "atomic_write", lambda p, b: (events.append(f"latest -> {b.decode()}"), real_write(p, b)))
    tmp = staging_dir(root, 4)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "shard.bin").write_bytes(b"1")
    (tmp / "meta.json").write_text("{}")
    commit_dir(root, 4, tmp)
    staged = tmp.name
    assert events == [f"fsync {staged}/sub/shard.bin", f"fsync {staged}/sub", f"fsync {staged}/meta.json",
                      f"fsync {staged}", "fsync .", "latest -> step_4"]


def test_keep_latest_k_prunes_the_oldest_and_never_the_latest(tmp_path):
    root = tmp_path / "ckpt"
    for step in (2, 4, 6):
        _save(root, step, keep=2)
    assert _visible(root) == ["latest", "step_4", "step_6"]
    _save(root, 8, keep=1)
    assert _visible(root) == ["latest", "step_8"]
    # a resumed job saving a lower step than one left from an earlier run: `latest` names it, so it stays
    _save(root, 10)
    _save(root, 3, keep=2)
    assert _visible(root) == ["latest", "step_10", "step_3"] and latest_dir(root).name == "step_3"
    assert prune(root, 1) == ["step_10"]
    assert latest_meta(str(root))["step"] == 3
    # 0 keeps everything
    for step in (5, 7):
        _save(root, step, keep=0)
    assert _visible(root) == ["latest", "step_3", "step_5", "step_7"]


def test_killed_while_replacing_a_checkpoint_rolls_back(tmp_path):
    """Re-saving step k moves the old step_<k> aside first; a kill before the new one is renamed in leaves `latest`
    naming a missing dir. Loading then reads the moved-aside copy, and the next save renames it back."""
    root = tmp_path / "ckpt"
    _save(root, 4, payload=b"old 4")
    aside = root / f".step_4.old{os.getpid() + 1}"
    (root / "step_4").rename(aside)  # the state at the kill
    assert latest_dir(root) == aside and latest_meta(str(root))["step"] == 4
    assert clean_staging(root) == [aside.name]
    assert _visible(root) == ["latest", "step_4"] and (root / "step_4" / "trainer.pt").read_bytes() == b"old 4"


def test_replacing_a_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    _save(root, 4, payload=b"old 4")
    _save(root, 4, payload=b"new 4")
    assert _visible(root) == ["latest", "step_4"] and (root / "step_4" / "trainer.pt").read_bytes() == b"new 4"


def test_keep_latest_k_flag():
    assert default_args().keep_latest_k == 0
    assert default_args(keep_latest_k=3).keep_latest_k == 3
    with pytest.raises(ConfigError, match="--keep-latest-k"):
        default_args(keep_latest_k=-1)


def test_ckpt_step_picks_a_checkpoint_or_names_the_ones_there(tmp_path):
    import json

    from streamrl.config import ConfigError, default_args

    for k in (2, 4):
        (tmp_path / f"step_{k}").mkdir()
        (tmp_path / f"step_{k}" / "meta.json").write_text(json.dumps({"step": k, "version": k}))
    (tmp_path / "latest").write_text("step_4")
    assert latest_meta(str(tmp_path))["step"] == 4 and latest_meta(str(tmp_path), 2)["step"] == 2
    with pytest.raises(FileNotFoundError, match=r"--ckpt-step 3: no complete checkpoint step_3 \(there: step_2, "
                                                 r"step_4\)"):
        latest_meta(str(tmp_path), 3)
    with pytest.raises(ConfigError, match="--ckpt-step .* needs --load"):
        default_args(ckpt_step=2)


def test_the_trainer_state_is_found_under_either_name(tmp_path):
    from pipelines.checkpoint import trainer_state

    (tmp_path / "fsdp").mkdir()
    assert trainer_state(tmp_path / "fsdp") == tmp_path / "fsdp" / "trainer.pt"
    (tmp_path / "megatron" / "trainer").mkdir(parents=True)
    assert trainer_state(tmp_path / "megatron") == tmp_path / "megatron" / "trainer"
    (tmp_path / "older" / "trainer.pt").mkdir(parents=True)  # Megatron checkpoints before the rename
    assert trainer_state(tmp_path / "older") == tmp_path / "older" / "trainer.pt"
