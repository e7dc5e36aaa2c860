"""The on-disk life of a checkpoint directory: staged, made durable, published by `latest`, pruned.

    <save>/.step_<k>.tmp<pid>/   written here first (hidden: never mistaken for a checkpoint)
    <save>/step_<k>/             renamed into place once every file and the directory are fsynced
    <save>/latest                then atomically rewritten to name it (fsynced): a reader sees the old
                                 checkpoint or the new one, never a partial one
    <save>/.step_<k>.old<pid>/   an older step_<k> being replaced (rolled back if the process dies mid-swap)
    <save>/.step_<k>.del<pid>/   a pruned checkpoint being deleted (`--keep-latest-k`)

A process killed mid-save leaves hidden leftovers and an intact `latest`. The next save in the directory removes
them (`clean_staging`); loading does not, because a reader must not race a live writer of the same directory.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from buffers.persist import atomic_write

logger = logging.getLogger("streamrl.checkpoint")

_STEP = re.compile(r"^step_(\d+)$")
_HIDDEN = re.compile(r"^\.(step_\d+)\.(tmp|old|del)\d+$")


def clean_staging(root: str | os.PathLike) -> list[str]:
    """Remove what a killed save left in `root`: staging and deletion leftovers; an `.old` copy of a checkpoint
    whose replacement never landed is renamed back instead. Returns the names removed or restored."""
    root = Path(root)
    done: list[str] = []
    if not root.is_dir():
        return done
    for p in sorted(root.iterdir()):
        m = _HIDDEN.match(p.name)
        if not m or not p.is_dir():
            continue
        final = root / m.group(1)
        if m.group(2) == "old" and not final.exists():  # died between moving it aside and renaming the new one in
            p.rename(final)
        else:
            shutil.rmtree(p)
        done.append(p.name)
    if done:
        logger.warning("checkpoint dir %s: removed or restored what an interrupted save left: %s", root, done)
    return done


def staging_dir(root: str | os.PathLike, step: int) -> Path:
    """A fresh, hidden directory in `root` to write checkpoint `step` into (after cleaning up earlier leftovers)."""
    clean_staging(root)
    tmp = Path(root) / f".step_{step}.tmp{os.getpid()}"
    tmp.mkdir(parents=True)
    return tmp


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(d: Path) -> None:
    """fsync every file under `d`, then each directory (a rename is durable only with its directory entry)."""
    for dirpath, _, files in os.walk(d, topdown=False):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


def commit_dir(root: str | os.PathLike, step: int, tmp: Path, keep_latest_k: int = 0) -> Path:
    """Make the complete staging dir `tmp` durable, rename it to `step_<step>` (replacing an older one), point
    `latest` at it, then keep only the newest `keep_latest_k` checkpoints (0: all)."""
    root = Path(root)
    fsync_tree(tmp)
    final = root / f"step_{step}"
    old = None
    if final.exists():
        old = root / f".{final.name}.old{os.getpid()}"
        final.rename(old)
    tmp.rename(final)
    _fsync(root)
    atomic_write(root / "latest", final.name.encode())
    if old is not None:
        shutil.rmtree(old)
    if keep_latest_k:
        prune(root, keep_latest_k)
    return final


def prune(root: str | os.PathLike, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoints (by step) of `root`; the one `latest` names always stays.
    Each goes through a hidden rename first, so a kill mid-delete never leaves a half checkpoint that looks whole."""
    root = Path(root)
    current = (root / "latest").read_text().strip() if (root / "latest").exists() else None
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir())
    others = [p for _, p in steps if p.name != current]
    doomed = others[: max(0, len(others) - (keep - (current is not None)))]
    for p in doomed:
        gone = root / f".{p.name}.del{os.getpid()}"
        p.rename(gone)
        shutil.rmtree(gone)
    if doomed:
        logger.info("checkpoint dir %s: pruned %s (--keep-latest-k %d)", root, [p.name for p in doomed], keep)
    return [p.name for p in doomed]


def latest_dir(root: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names, or None when `root` has none. Read-only: a save interrupted while replacing
    that very checkpoint left it as `.step_<k>.old<pid>`, which is returned then."""
    pointer = Path(root) / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    d = Path(root) / name
    if not d.exists():
        d = next((p for p in sorted(Path(root).glob(f".{name}.old*")) if (p / "meta.json").exists()), d)
    if not (d / "meta.json").exists():
        raise FileNotFoundError(f"{pointer} names {d}, which is not a complete checkpoint")
    return d
