"""Resumable checkpoints of an async job (`--save DIR --save-interval N`, resumed with `--load DIR`).

A checkpoint is a directory `<save>/step_<k>/` written under a temporary name, fsynced and renamed when complete;
the file `<save>/latest` names the newest one (written atomically after the rename), so a crash leaves the previous
checkpoint intact; the next save removes the leftovers, and `--keep-latest-k` prunes old ones (checkpoint_dir.py).
It holds:

    trainer.pt         model + optimizer (+ critic) as full state dicts (any number of FSDP ranks can load it);
    trainer/           instead, with --train-backend megatron: a Megatron checkpoint directory (--ckpt-format;
                       train/megatron/); checkpoints of earlier versions kept it under the name trainer.pt
    buffer.msgpack     the RolloutBuffer's state: queued groups, ledger, version, replay, stashed partials
    producers.msgpack  the data source cursor, the groups to resume (partials, with their prefixes) and the
                       groups to regenerate (in flight at the checkpoint: their pristine prompts)
    meta.json          step k, policy version v, the metrics.jsonl byte offset, whether the trainer's weights are
                       the ones published as v, and the flags the saved state depends on (PACING_FLAGS)

In-flight groups (semantics): a checkpoint taken while the producers run pauses admission for a moment, takes
the source cursor and a copy of every in-flight group with its responses reset (generation goes on meanwhile),
then snapshots the buffer. Groups that the buffer's ledger still calls `in_flight` are saved as pristine prompts;
on resume they are stashed as `partial` with reason "regenerated at resume" and generated again from the prompt
(counted under that reason: regenerated, not lost; their half-done responses are discarded). Groups cut off by
the final stop are saved with their prefixes and resumed as partial rollouts. Nothing admitted is lost, and
trained groups stay `trained` in the ledger, so none is trained twice.

Resuming with other flags: `--n-samples-per-prompt` must match (the saved groups have that size: refused at load,
naming the flag). The pacing flags (`--rollout-batch-size`, `--global-batch-size`, `--update-weights-interval`,
`--max-staleness`) may change: admission pacing restarts from the checkpoint's position under the new flags
(`RolloutBuffer.set_pacing_origin`), and the changes are printed. Versions: when the checkpoint was taken between
two publishes (step not a multiple of the interval), the trainer's weights are newer than version v, so the resumed
job publishes them as v + 1 rather than labelling them v.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec
import ray
import torch

from buffers.ledger import IN_FLIGHT, PARTIAL
from buffers.persist import atomic_write, read_state
from pipelines.checkpoint_dir import commit_dir, latest_dir, staging_dir
from streamrl.train.megatron.checkpoint import read_hf_weights
from streamrl.types import decode_groups, encode

REGENERATED = "regenerated at resume"
PACING_FLAGS = ("n_samples_per_prompt", "rollout_batch_size", "global_batch_size", "update_weights_interval",
                "max_staleness")


def latest_meta(root: str, step: int | None = None) -> dict[str, Any]:
    """The meta.json of the latest checkpoint in `root`, or of `step_<step>` (`--ckpt-step`, Megatron's flag);
    FileNotFoundError naming what is missing."""
    if step is not None:
        d = Path(root) / f"step_{step}"
        if not (d / "meta.json").exists():
            have = sorted(p.name for p in Path(root).glob("step_*") if (p / "meta.json").exists())
            raise FileNotFoundError(f"--load {root} --ckpt-step {step}: no complete checkpoint {d.name} (there: "
                                    f"{', '.join(have) or 'none'})")
        return {**json.loads((d / "meta.json").read_text()), "dir": str(d)}
    d = latest_dir(root)
    if d is None:
        raise FileNotFoundError(f"--load {root}: no checkpoint there (no `latest` file)")
    return {**json.loads((d / "meta.json").read_text()), "dir": str(d)}


def save_checkpoint(c: Any, root: str, step: int, version: int, metrics_offset: int, args: Any) -> Path:
    """Checkpoint the running job after train step `step` (see the module docstring); returns the directory."""
    tmp = staging_dir(root, step)
    prod = ray.get(c.manager.checkpoint_state.remote())  # pauses admission until resume_admission
    try:
        ray.get(c.buffer.save.remote(str(tmp / "buffer.msgpack")))
    finally:
        ray.get(c.manager.resume_admission.remote())
    states = read_state(tmp / "buffer.msgpack")["ledger"]["state"]
    in_flight = {g for g, s in states.items() if s == IN_FLIGHT}
    regen = [g for g in prod["live"] if g[0].group_id in in_flight]
    partials = [g for g in prod["partials"] if states.get(g[0].group_id) == PARTIAL]
    missing = in_flight - {g[0].group_id for g in regen}
    if missing:
        raise RuntimeError(f"checkpoint: in-flight groups unknown to the producers: {sorted(missing)[:5]}")
    atomic_write(tmp / "producers.msgpack", msgspec.msgpack.encode(
        {"source": prod["source"], "regenerate": encode(regen), "partials": encode(partials)}))
    c.trainer.save_state(str(tmp / ("trainer" if args.train_backend == "megatron" else "trainer.pt")))
    if args.save_hf:  # slime's --save-hf: an HF export next to each checkpoint
        c.trainer.save_hf(args.save_hf.format(rollout_id=step))
    meta = {"step": step, "version": version, "metrics_offset": metrics_offset, "regenerate": len(regen),
            "partials": len(partials), "weights_published": step % args.update_weights_interval == 0,
            "flags": {k: getattr(args, k) for k in PACING_FLAGS}}
    (tmp / "meta.json").write_text(json.dumps(meta))
    return commit_dir(root, step, tmp, keep_latest_k=args.keep_latest_k)


def check_flags(meta: dict[str, Any], args: Any) -> dict[str, tuple[Any, Any]]:
    """The pacing flags that differ from the checkpoint's, {flag: (saved, now)}; raises ValueError (naming the flag)
    for a change the saved state cannot follow."""
    saved = meta.get("flags") or {}
    changed = {k: (saved[k], getattr(args, k)) for k in PACING_FLAGS if k in saved and saved[k] != getattr(args, k)}
    if "n_samples_per_prompt" in changed:
        was, now = changed["n_samples_per_prompt"]
        raise ValueError(f"--load {meta['dir']}: the checkpoint's groups have {was} samples each but "
                         f"--n-samples-per-prompt is {now}: resume with --n-samples-per-prompt {was}")
    return changed


def resume_version(meta: dict[str, Any], update_interval: int) -> int:
    """The version a resumed job publishes the checkpoint's weights as: the saved `v` when they are the weights
    published as `v`, else `v + 1` (trained past the last publish: newer weights must not carry an older label)."""
    published = meta.get("weights_published", meta["step"] % update_interval == 0)  # older checkpoints: infer it
    return meta["version"] + (0 if published else 1)


def load_checkpoint(c: Any, root: str, args: Any) -> dict[str, Any]:
    """Restore trainer, buffer and producers from the latest checkpoint in `root` (before producers start);
    returns its meta (step, version to publish the trainer's weights as, metrics_offset, changed flags)."""
    meta = latest_meta(root, args.ckpt_step)
    meta["changed_flags"] = check_flags(meta, args)
    d = Path(meta["dir"])
    c.trainer.load_state(str(trainer_state(d)))
    ray.get(c.buffer.load.remote(str(d / "buffer.msgpack")))
    prod = msgspec.msgpack.decode((d / "producers.msgpack").read_bytes())
    partials, regen = decode_groups(prod["partials"]), decode_groups(prod["regenerate"])
    ray.get(c.buffer.stash_partials.remote(partials, "stopped"))
    ray.get(c.buffer.stash_partials.remote(regen, REGENERATED))
    meta["saved_version"] = meta["version"]
    meta["version"] = resume_version(meta, args.update_weights_interval)
    ray.get(c.buffer.set_pacing_origin.remote(meta["step"], meta["version"]))
    tokens = ray.get(c.buffer.token_ledger.remote())  # what the restored groups account for
    base = tokens["trained"] + sum(tokens["discarded"].values()) + sum(tokens["carried"].values())
    ray.get(c.manager.restore.remote(prod["source"], True, base))
    return meta


def trainer_state(d: Path) -> Path:
    """The trainer's part of a checkpoint directory: `trainer/` (Megatron) or `trainer.pt` (FSDP, and Megatron
    checkpoints of earlier versions)."""
    return d / "trainer" if (d / "trainer").is_dir() else d / "trainer.pt"


def saved_weight_diff(c: Any, d: str | os.PathLike) -> float:
    """Largest |trainer - checkpoint| over the policy's parameters (0.0: the load restored them exactly)."""
    path = trainer_state(Path(d))
    if path.is_dir():  # --train-backend megatron: a Megatron checkpoint in that directory
        saved = read_hf_weights(path)
    else:
        saved = torch.load(path, map_location="cpu", weights_only=False)["policy"]
    trainer = dict(c.trainer.full_named_parameters())
    if set(trainer) - set(saved):
        raise RuntimeError(f"checkpoint lacks parameters {sorted(set(trainer) - set(saved))[:3]}")
    return max((trainer[k] - saved[k]).abs().max().item() for k in trainer)
