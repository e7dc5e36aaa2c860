"""Megatron's `torch_dist` checkpoint format (`--ckpt-format torch_dist`, Megatron's and slime's default), written and
read with megatron-core's `dist_checkpointing`:

    <dir>/latest_checkpointed_iteration.txt
    <dir>/iter_0000042/{metadata.json, .metadata, __*_*.distcp[, common.pt]}

The model goes in as `GPTModel.sharded_state_dict()`: layers stacked along a leading axis and the keys of
TransformerEngine's layer spec (`self_attention.linear_qkv.layer_norm_weight` for `input_layernorm.weight`), so the
directory has the names and shapes of a slime/Megatron checkpoint of the same model; the layout does not depend on
the TP size. The optimizer is torch's (streamrl/train/optim.py): its moments are saved sharded like their parameters
(`optimizer.state.exp_avg.<key>`), its step count and hyper-parameters in the common (non-tensor) state with
streamrl's counters: common.pt up to megatron-core 0.16, an object inside the .distcp files from 0.19 on;
`load_common_state_dict` reads either. With `--use-distributed-optimizer` each data-parallel rank holds the moments
of its share of the parameters only: it writes those as the main replica and reads back the same share, so the
files are the same as without it and a resume may change the data-parallel size.

megatron-core's writer assumes CUDA in two calls (a final synchronize and the device of a one-int failure flag);
without a GPU both are routed to the CPU while saving, so the same code runs in the CPU tests.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map, optim_state_to_sharding_state
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from streamrl.train.optim import is_sharded, local_optimizer

LATEST = "latest_checkpointed_iteration.txt"
# TransformerEngine-spec keys that the local spec maps its norms to (gpt_layer_specs' sharded_state_dict_keys_map)
TE_NORMS = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
            "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def iter_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def resolve_iter(path: str | Path, iteration: int | None = None) -> Path:
    """The iteration directory: `path` itself, or under a checkpoint root its `iteration` (slime's --ckpt-step,
    --ref-ckpt-step) or else the latest one."""
    p = Path(path)
    if iteration is not None:
        d = iter_dir(p, iteration)
        if not d.is_dir():
            have = sorted(x.name for x in p.glob("iter_*"))
            raise FileNotFoundError(f"{p}: no iteration {iteration} (has {have})")
        return d
    if (p / LATEST).exists():
        return iter_dir(p, int((p / LATEST).read_text().strip()))
    return p


def is_torch_dist(path: str | Path, iteration: int | None = None) -> bool:
    """An iteration directory in torch_dist format, or a root whose latest (or given) iteration is one."""
    return (resolve_iter(path, iteration) / "metadata.json").exists()


@contextmanager
def _cpu_cuda_calls() -> Iterator[None]:
    if torch.cuda.is_available():
        yield
        return
    sync, current = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize, torch.cuda.current_device = (lambda *a, **k: None), (lambda: "cpu")
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = sync, current


def _sharded_state(gpt: Any, opt: Any | None, extra: dict[str, Any], tied: bool = False) -> dict[str, Any]:
    """What goes to (or is read from) disk: the model's sharded tensors; with `opt`, torch's optimizer state with
    its per-parameter tensors sharded like the parameters and the scalar `step`s kept in the common state.
    `tied`: a last pipeline stage's copy of the tied embedding is a replica of the first stage's (Megatron's way)."""
    model = gpt.sharded_state_dict()
    if tied and gpt.post_process and not gpt.pre_process:
        gpt.tie_embeddings_and_output_weights_state_dict(model, "output_layer.weight",
                                                         "embedding.word_embeddings.weight",
                                                         ensure_metadata_has_dp_cp_group(None))
    state: dict[str, Any] = {"model": model, "checkpoint_version": 3.0, "streamrl": extra}
    if opt is not None:
        local = local_optimizer(opt)
        osd = local.state_dict()
        osd["state"] = {pid: dict(s) for pid, s in osd["state"].items()}  # the live optimizer's dicts otherwise
        steps = {pid: s.pop("step") for pid, s in osd["state"].items() if "step" in s}
        optim_state_to_sharding_state(osd, get_param_id_to_sharded_param_map(model, _params(local)))
        if is_sharded(opt):
            for entry in osd["state"].values():
                for sharded in entry.values():
                    _own(sharded)
        state["optimizer"] = osd
        # one step count: every trainable parameter steps together, and the common state must be the same on every
        # rank (parameter ids are per pipeline stage; a sharded optimizer's rank may own no parameter at all)
        step = torch.tensor(max((float(v) for v in steps.values()), default=0.0), dtype=torch.float64)
        if is_sharded(opt):
            dist.all_reduce(step, op=dist.ReduceOp.MAX)
        state["streamrl_optimizer"] = {"step": step.item(),
                                       "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                                        for g in osd["param_groups"]]}
    return state


def _own(sharded: Any) -> None:
    """A sharded optimizer's state is on its owner only (not on the other data-parallel ranks, whose replica ids
    the parameter's metadata counts): the owner writes it, its context-parallel peers (same state) do not."""
    rid, cp = sharded.replica_id, parallel_state.get_context_parallel_rank()
    sharded.replica_id = (*rid[:-1], cp) if isinstance(rid, tuple) else cp


def _params(opt: Any) -> list[torch.nn.Parameter]:
    return [p for g in opt.param_groups for p in g["params"]]


def init_optimizer_state(opt: Any) -> None:
    """Zero moments for every parameter (torch's AdamW creates them on its first step): the template that a load
    fills; a step count of 0."""
    opt = local_optimizer(opt)
    for p in _params(opt):
        if not opt.state[p]:
            if isinstance(opt, torch.optim.AdamW | torch.optim.Adam):
                opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                "exp_avg_sq": torch.zeros_like(p)}
            elif isinstance(opt, torch.optim.SGD) and opt.defaults.get("momentum", 0):
                opt.state[p] = {"momentum_buffer": torch.zeros_like(p)}


def save_torch_dist(root: str | Path, iteration: int, gpt: Any, opt: Any | None, extra: dict[str, Any],
                    tied: bool = False) -> Path:
    """Collective on every rank (data-parallel replicas write nothing twice: Megatron's replica ids)."""
    d = iter_dir(root, iteration)
    if dist.get_rank() == 0:
        d.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if opt is not None:
        init_optimizer_state(opt)  # a save before the first step still has moments to write
    with _cpu_cuda_calls():
        dist_checkpointing.save(_sharded_state(gpt, opt, {**extra, "iteration": iteration}, tied), str(d))
    dist.barrier()
    if dist.get_rank() == 0:
        (Path(root) / LATEST).write_text(str(iteration))
    return d


def load_torch_dist(root: str | Path, gpt: Any, opt: Any | None, tied: bool = False) -> dict[str, Any]:
    """Load the latest iteration into `gpt` (and `opt`, when the checkpoint has its state); streamrl's counters."""
    marker = Path(root) / LATEST
    if not marker.exists():
        raise FileNotFoundError(f"{root}: not a Megatron checkpoint (no {LATEST})")
    d = iter_dir(root, int(marker.read_text().strip()))
    common = dist_checkpointing.load_common_state_dict(str(d))
    with_optim = opt is not None and "streamrl_optimizer" in common
    if with_optim:
        init_optimizer_state(opt)
    state = dist_checkpointing.load(_sharded_state(gpt, opt if with_optim else None, {}, tied), str(d))
    gpt.load_state_dict(state["model"])
    if with_optim:
        saved = common["streamrl_optimizer"]
        osd = state["optimizer"]
        for pid, s in osd["state"].items():
            s["step"] = torch.tensor(saved["step"] if "step" in saved else saved["steps"][pid])  # older: per id
        local = local_optimizer(opt)
        osd["param_groups"] = [{**g, "params": cur["params"]} for g, cur in
                               zip(saved["param_groups"], local.state_dict()["param_groups"], strict=True)]
        local.load_state_dict(osd)
    return common["streamrl"]


def read_model(root: str | Path, iteration: int | None = None) -> dict[str, torch.Tensor]:
    """The latest (or given) iteration's model in full, in one process without torch.distributed: Megatron
    local-spec names per layer (`decoder.layers.3.input_layernorm.weight`), the vocabulary still padded."""
    reader = FileSystemReader(str(resolve_iter(root, iteration)))
    meta = reader.read_metadata().state_dict_metadata
    want = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
            if isinstance(m, TensorStorageMetadata) and not k.startswith("optimizer.")}
    with warnings.catch_warnings():  # "torch.distributed is disabled ... load in a single process": yes, on purpose
        warnings.simplefilter("ignore", UserWarning)
        dcp_load(want, storage_reader=reader, no_dist=True)
    out: dict[str, torch.Tensor] = {}
    for key, t in want.items():
        if not key.startswith("decoder.layers."):
            out[key] = t
            continue
        rest = key.removeprefix("decoder.layers.")
        rest = TE_NORMS.get(rest, rest)
        for i in range(t.shape[0]):
            out[f"decoder.layers.{i}.{rest}"] = t[i].clone()
    return out


def read_extra(root: str | Path, iteration: int | None = None) -> dict[str, Any]:
    """streamrl's entry of an iteration's common state (empty for a checkpoint another program wrote)."""
    return dist_checkpointing.load_common_state_dict(str(resolve_iter(root, iteration))).get("streamrl", {})
