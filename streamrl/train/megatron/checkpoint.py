"""Megatron's checkpoint layout (its `torch` format: one file per model-parallel rank), written with torch.save:

    <dir>/latest_checkpointed_iteration.txt        the newest iteration, as text
    <dir>/iter_0000042/mp_rank_00/model_optim_rng.pt   {"model", "optimizer", "iteration", "checkpoint_version",
                                                        "rng_state", "streamrl"} of TP rank 00

`model` holds Megatron names (the TP shard; the vocabulary padded), so Megatron's own loader reads the model part;
`streamrl` holds the step counters and the conversion's `Arch`, so `read_hf_weights` needs nothing else.
`--ckpt-format torch` writes this layout (it resumes exactly on the same TP size); the default, torch_dist, is in
dist_ckpt.py. `read_hf_weights` reads both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from streamrl.train.megatron.convert import Arch, megatron_to_hf, tp_gather
from streamrl.train.megatron.dist_ckpt import LATEST, is_torch_dist, read_extra, read_model


def rank_file(root: str | Path, iteration: int, tp_rank: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}" / f"mp_rank_{tp_rank:02d}" / "model_optim_rng.pt"


def save_megatron(root: str | Path, iteration: int, tp_rank: int, model: dict[str, Any],
                  optimizer: dict[str, Any] | None, extra: dict[str, Any]) -> Path:
    """Write one TP rank's file, then (TP rank 0) the `latest` marker, so that it never names a missing file."""
    f = rank_file(root, iteration, tp_rank)
    f.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": {k: v for k, v in model.items() if not k.endswith("_extra_state")}, "optimizer": optimizer,
             "iteration": iteration, "checkpoint_version": 3.0, "rng_state": torch.get_rng_state(), "streamrl": extra}
    torch.save(state, f)
    if tp_rank == 0:
        (Path(root) / LATEST).write_text(str(iteration))
    return f


def load_megatron(root: str | Path, tp_rank: int, iteration: int | None = None) -> dict[str, Any]:
    """TP rank `tp_rank`'s state at `iteration` (default: the one `latest_checkpointed_iteration.txt` names)."""
    marker = Path(root) / LATEST
    if iteration is None:
        if not marker.exists():
            raise FileNotFoundError(f"{root}: not a Megatron checkpoint (no {LATEST})")
        iteration = int(marker.read_text().strip())
    f = rank_file(root, iteration, tp_rank)
    if not f.exists():
        raise FileNotFoundError(f"{root}: no {f.relative_to(root)} (iteration {iteration}, TP rank {tp_rank}): "
                                "was it saved with another --tensor-model-parallel-size?")
    return torch.load(f, map_location="cpu", weights_only=False)


def read_hf_weights(root: str | Path, arch: Arch | None = None, iteration: int | None = None
                    ) -> dict[str, torch.Tensor]:
    """The latest (or given) iteration's model in full under HF names (padding removed), from either format: torch
    (every TP rank's file gathered) or torch_dist. `arch` is needed only for a checkpoint streamrl did not write."""
    if is_torch_dist(root, iteration):
        extra = read_extra(root, iteration)
        model = read_model(root, iteration)
        return megatron_to_hf(model, Arch(**extra["arch"]) if "arch" in extra else _need(arch, root))
    first = load_megatron(root, 0, iteration)
    files = sorted(rank_file(root, first["iteration"], 0).parent.parent.glob("mp_rank_*/model_optim_rng.pt"))
    models = [first["model"]] + [torch.load(f, map_location="cpu", weights_only=False)["model"] for f in files[1:]]
    full = {k: tp_gather(k, [m[k] for m in models]) for k in first["model"]}
    extra = first.get("streamrl") or {}
    return megatron_to_hf(full, Arch(**extra["arch"]) if "arch" in extra else _need(arch, root))


def _need(arch: Arch | None, root: str | Path) -> Arch:
    if arch is None:
        raise ValueError(f"{root}: a Megatron checkpoint without streamrl's architecture record: give the Arch of "
                         "--hf-checkpoint")
    return arch
