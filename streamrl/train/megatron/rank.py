"""One Megatron-core training rank (a Ray actor): the FSDP rank's step, sync and HF export over a GPTModel.

What is shared with `FSDPTrainRank` (inherited, not copied): the train step (micro-batches, the one RL step of
`streamrl/train/step.py`, the optimizer steps with clipping and skip-on-non-finite, the metrics), weight staging
and pushing through `streamrl/sync`, `save_hf`. What differs:
- the model: `GPTModel` (local spec) built from Megatron's flags, loaded from `--hf-checkpoint` through
  `convert.py`, seen by the step through `HFLikeModel`; data parallel over ranks with torch DDP (gradients
  averaged, the step scales each rank's loss by the DP size as with FSDP);
- the optimizer: torch AdamW/SGD on fp32 parameters (`--bf16`: bf16 autocast in the forward);
  `--use-distributed-optimizer` shards its state over the data-parallel ranks (ZeRO-1, `streamrl/train/optim.py`)
  instead of Megatron's `DistributedOptimizer`, which needs CUDA tensors and Megatron's DDP gradient buffers;
- parallelism: tensor (TP), sequence (`--sequence-parallel`, model.py), pipeline (`pipeline.py`: stages by
  point-to-point, the last stage's output broadcast so the step runs unchanged on every stage), context
  (`context.py`: all-gather attention) and data parallel; gradients finished here (`_clip_grad_norm`);
- `full_named_parameters`: Megatron tensors gathered over TP and stages, converted to HF names (what the engines
  load);
- `save_state`/`load_state`: Megatron's checkpoint formats (`dist_ckpt.py` torch_dist, `checkpoint.py` torch);
- slime's three hooks (`--custom-megatron-*-path`).
Frozen models (--ref-load, the OPD teacher) are HF models: they only score log-probs, as in the FSDP rank; they
load from an HF directory or from a Megatron checkpoint converted to HF names.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from transformers import AutoConfig, AutoModelForCausalLM

from streamrl.plugins import load_function
from streamrl.train.batch import TrainBatch
from streamrl.train.critic import ValueModel
from streamrl.train.freeze import freeze_params
from streamrl.train.fsdp import PACKED_CHUNK, FSDPTrainRank
from streamrl.train.kernels import attention_options, compile_layers, fuse_head
from streamrl.train.megatron.checkpoint import load_megatron, read_hf_weights, save_megatron
from streamrl.train.megatron.context import cp_size, sum_grads
from streamrl.train.megatron.convert import megatron_to_hf_tensor, tp_dim, tp_gather
from streamrl.train.megatron.dist_ckpt import LATEST, is_torch_dist, load_torch_dist, save_torch_dist
from streamrl.train.megatron.model import HFLikeModel, build_gpt, load_hf_state
from streamrl.train.megatron.parallel import init_model_parallel
from streamrl.train.megatron.pipeline import (
    Stage,
    finalize_tied_grads,
    gather_stages,
    global_name,
    is_tied_copy,
    layer_offset,
)
from streamrl.train.optim import build_optimizer

logger = logging.getLogger(__name__)


class MegatronTrainRank(FSDPTrainRank):
    """Wrap with `ray.remote`; every public method is called on all ranks at once (they hold collectives)."""

    def init(self, master_addr: str, master_port: int, memory_fraction: float | None = None,
             shares_gpu: bool = True) -> dict[str, Any]:
        args = self.args
        self.shares_gpu = shares_gpu
        if args.bf16 and not torch.cuda.is_available():  # Megatron's linear backward runs under CUDA autocast only
            raise ValueError("--bf16 with --train-backend megatron needs a GPU (on CPU train in fp32: drop --bf16)")
        self._init_process(master_addr, master_port, memory_fraction)
        init_model_parallel(args, args.seed)
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        # the step shards the batch and reduces its sums over the data-parallel group (TP peers share samples)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.stage = Stage(self.device) if args.pipeline_model_parallel_size > 1 else None  # pipeline.py
        # context parallel splits padded rows (context.py): a --qkv-format thd micro-batch runs padded, same values
        self.packed = args.qkv_format == "thd" and cp_size() == 1
        if args.qkv_format == "thd" and not self.packed and self.rank == 0:
            logger.warning("--qkv-format thd with --context-parallel-size %d: micro-batches run padded (context "
                           "parallel here splits padded rows)", cp_size())

        cfg = AutoConfig.from_pretrained(args.hf_checkpoint)
        self.gpt, self.arch = build_gpt(args, cfg, self.device)
        hf = AutoModelForCausalLM.from_pretrained(args.hf_checkpoint, dtype=torch.float32)
        load_hf_state(self.gpt, hf.state_dict(), self.arch, self.tp_rank, self.tp_size)
        del hf
        if args.use_torch_compile:  # per decoder layer, as the FSDP rank (kernels.py)
            compile_layers(self.gpt.decoder.layers)
        # --log-probs-chunk-size (and --qkv-format thd): the response positions through the LM head in chunks, as
        # the FSDP rank does; with TP > 1 the head's weight is vocabulary-sharded: whole logits instead
        chunk = max(args.log_probs_chunk_size, 0) or (PACKED_CHUNK if args.qkv_format == "thd" else 0)
        model = HFLikeModel(self.gpt, self.arch, bf16=args.bf16, padding_idx=cfg.pad_token_id,
                            log_probs_chunk=chunk if self.tp_size == 1 else 0, stage=self.stage)
        if args.use_torch_compile:
            fuse_head(model)
        if self.dp_size > 1:  # gradients averaged over the data-parallel ranks (the step scales losses by DP)
            model = torch.nn.parallel.DistributedDataParallel(model, process_group=self.dp_group)
        self.model = model
        params = list(self.gpt.parameters())
        offset = layer_offset(self.gpt)  # Megatron names with global layer numbers, as slime's patterns see them
        self.frozen_params = freeze_params(((global_name(n, offset), p) for n, p in self.gpt.named_parameters()),
                                           args.only_train_params_name_list, args.freeze_params_name_list)
        self.opt = self._optimizer([p for p in params if p.requires_grad])
        if args.use_kl_loss or args.kl_coef > 0:
            self.ref_model = self._frozen(args.ref_load or args.hf_checkpoint, args.ref_ckpt_step)
        if args.use_opd or args.advantage_estimator == "on_policy_distillation":
            self.teacher = self._frozen(args.opd_teacher_load, args.opd_teacher_ckpt_step)
        if args.advantage_estimator == "ppo":
            self._build_critic()
        self.pad_id = cfg.pad_token_id or 0
        self.runner = self._runner()
        if args.custom_megatron_init_path:  # slime: fn(args), once the model is set up
            load_function(args.custom_megatron_init_path, None, "--custom-megatron-init-path")(args)
        return {"rank": self.rank, "device": str(self.device), "tp_rank": self.tp_rank,
                "params": sum(p.numel() for p in params)}

    def _optimizer(self, params: Any) -> torch.optim.Optimizer:
        """--use-distributed-optimizer: the state of each parameter on one data-parallel rank (its TP, PP and CP
        peers shard their own parameters the same way)."""
        return build_optimizer(self.args, params, self.dp_group if self.args.use_distributed_optimizer else None)

    def _build_critic(self) -> None:
        """The PPO critic as the FSDP rank's (`critic.py`: an HF decoder with a value head, its own AdamW), whole on
        every rank: data parallel with torch DDP like the policy; TP peers see the same samples and keep equal
        replicas."""
        a = self.args
        critic = ValueModel.from_pretrained(a.hf_checkpoint, **attention_options(a)).to(self.device)
        self.critic_opt = torch.optim.AdamW(critic.parameters(), lr=a.critic_lr or a.lr, weight_decay=a.weight_decay,
                                            betas=(a.adam_beta1, a.adam_beta2))
        self.critic = critic if self.dp_size == 1 else torch.nn.parallel.DistributedDataParallel(
            critic, process_group=self.dp_group)

    def _critic_states(self) -> dict[str, Any]:
        if self.critic is None:
            return {}
        module = getattr(self.critic, "module", self.critic)
        return {"critic": module.state_dict(), "critic_optim": self.critic_opt.state_dict()}

    def _frozen(self, path: str, iteration: int | None = None) -> Any:
        """A frozen HF model (reference, teacher) from an HF directory or a Megatron checkpoint of the same
        architecture (either format; slime's --ref-load is a torch_dist one)."""
        kw = {"dtype": torch.bfloat16 if self.args.bf16 else torch.float32, **attention_options(self.args)}
        if not (Path(path) / "config.json").exists() and (Path(path) / LATEST).exists():
            m = AutoModelForCausalLM.from_pretrained(self.args.hf_checkpoint, **kw)
            missing, unexpected = m.load_state_dict(read_hf_weights(path, self.arch, iteration), strict=False)
            if unexpected or [k for k in missing if k != "lm_head.weight"]:
                raise ValueError(f"{path}: not a Megatron checkpoint of --hf-checkpoint's architecture "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        else:
            if iteration is not None:
                raise ValueError(f"--ref-ckpt-step / --opd-teacher-ckpt-step {iteration}: {path} is not a Megatron "
                                 "checkpoint (no latest_checkpointed_iteration.txt)")
            m = AutoModelForCausalLM.from_pretrained(path, **kw)
        return m.to(self.device).eval().requires_grad_(False)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """slime's hooks, then the FSDP rank's step on the GPTModel. slime calls its before-log-prob hook before
        the no-grad forwards and the before-train-step hook before each optimizer step; here both run once per
        train step, in that order (step_id 0; no LR scheduler object: None)."""
        a = self.args
        if a.custom_megatron_before_log_prob_hook_path:
            load_function(a.custom_megatron_before_log_prob_hook_path, None,
                          "--custom-megatron-before-log-prob-hook-path")(a, [self.gpt], "")
        if a.custom_megatron_before_train_step_hook_path:
            load_function(a.custom_megatron_before_train_step_hook_path, None,
                          "--custom-megatron-before-train-step-hook-path")(a, self.steps_done, 0, [self.gpt],
                                                                           self.opt, None)
        return super().train_step(batch)

    def _clip_grad_norm(self) -> torch.Tensor:
        """Finish the gradients for TP as Megatron's finalize_model_grads does (the q/k norms act on each rank's
        own heads, and with --sequence-parallel every norm on the rank's part of the sequence: their gradients are
        partial sums over TP), then the total norm over the whole model (squares of TP-sharded gradients summed over
        TP, replicated ones counted once), clipped to --clip-grad as torch's clip_grad_norm_ does."""
        tp_group = parallel_state.get_tensor_model_parallel_group()
        if cp_size() > 1:  # each CP rank's gradient covers its part of the sequences
            sum_grads(list(self.gpt.parameters()))
        if self.stage is not None:
            finalize_tied_grads(self.gpt, self.arch.tied)
        named = [(n, p) for n, p in self.gpt.named_parameters() if p.grad is not None]
        if self.tp_size > 1:
            # with --sequence-parallel every norm (not only q/k's) saw only this rank's part of the sequence
            sp = self.gpt.config.sequence_parallel
            for name, p in named:
                if "q_layernorm" in name or "k_layernorm" in name or (sp and "layernorm" in name):
                    dist.all_reduce(p.grad, group=tp_group)
        # which tensors are TP shards: by name, as the conversion splits them (Megatron's own parameter attribute
        # is only set when it initialises the weights, which it does not here)
        sharded = torch.zeros((), dtype=torch.float64, device=self.device)
        replicated = torch.zeros_like(sharded)
        for name, p in named:
            if is_tied_copy(self.gpt, self.arch.tied, name):
                continue  # the first stage counts the tied embedding
            if tp_dim(name) is None:
                replicated += p.grad.double().square().sum()
            else:
                sharded += p.grad.double().square().sum()
        if self.tp_size > 1:
            dist.all_reduce(sharded, group=tp_group)
        total = sharded + replicated
        if self.stage is not None:  # each stage holds its own layers
            dist.all_reduce(total, group=self.stage.group)
        total = total.sqrt().float()
        torch.nn.utils.clip_grads_with_norm_([p for _, p in named], self.args.clip_grad, total)
        return total

    def full_named_parameters(self, keep_on_device: bool = False, all_ranks: bool = False
                              ) -> list[tuple[str, Any]] | None:
        """Every tensor gathered over TP (and the pipeline stages) and converted to its HF name(s), vocabulary
        padding removed (collective on all ranks); global rank 0 (every rank with `all_ranks`) gets them (CPU
        unless `keep_on_device`), the others None."""
        group = parallel_state.get_tensor_model_parallel_group()
        offset, stage = layer_offset(self.gpt), self.stage
        mine = self.rank == 0 or all_ranks
        convert = mine or (stage is not None and 0 in stage.ranks)  # rank 0's pipeline gathers every stage
        to_cpu = not keep_on_device and stage is None  # with stages: after the gather (it broadcasts device tensors)
        out: list[tuple[str, Any]] = []
        for name, t in self.gpt.state_dict().items():
            if name.endswith("_extra_state") or is_tied_copy(self.gpt, self.arch.tied, name):
                continue
            t = t.detach()
            if self.tp_size > 1:
                shards = [torch.empty_like(t) for _ in range(self.tp_size)]
                dist.all_gather(shards, t.contiguous(), group=group)
                t = tp_gather(name, shards)
            if convert:
                for hf_name, x in megatron_to_hf_tensor(global_name(name, offset), t, self.arch):
                    out.append((hf_name, x.to("cpu", copy=True) if to_cpu else x))
        if stage is not None and convert:
            out = gather_stages(out, stage, all_ranks)
            if mine and not keep_on_device:
                out = [(n, x.to("cpu", copy=True)) for n, x in out]
        return out if mine else None

    def save_state(self, path: str) -> None:
        """Megatron's layout in the directory `path`, in --ckpt-format: torch_dist (dist_ckpt.py; every rank takes
        part) or torch (checkpoint.py; data-parallel rank 0 of each TP rank writes its shard)."""
        optimizer = None if self.args.no_save_optim else self.opt
        extra = {"steps_done": self.steps_done, "skipped_steps": self.skipped_steps,
                 "arch": dataclasses.asdict(self.arch), **self._critic_states(), **self._ref_state()}  # replicated
        if self.args.ckpt_format == "torch_dist":
            save_torch_dist(path, self.steps_done, self.gpt, optimizer, extra, tied=self.arch.tied)
            return
        if parallel_state.get_data_parallel_rank() == 0:
            save_megatron(path, self.steps_done, self.tp_rank, self.gpt.state_dict(),
                          None if optimizer is None else optimizer.state_dict(), extra)
        dist.barrier()

    def load_state(self, path: str) -> None:
        """Either format, whichever `path` holds (--ckpt-format names only what --save writes)."""
        if is_torch_dist(path):
            extra = load_torch_dist(path, self.gpt, self.opt, tied=self.arch.tied)
        else:
            state = load_megatron(path, self.tp_rank)
            self.gpt.load_state_dict(state["model"])
            if state.get("optimizer") is not None:
                self.opt.load_state_dict(state["optimizer"])
            extra = state["streamrl"]
        self.steps_done = int(extra["steps_done"])
        self.skipped_steps = int(extra["skipped_steps"])
        if "ref" in extra and self.ref_model is not None:
            self.ref_model.load_state_dict(extra["ref"])
        if self.critic is not None:
            if "critic" not in extra:
                raise ValueError(f"{path}: a checkpoint without the PPO critic (--advantage-estimator ppo)")
            getattr(self.critic, "module", self.critic).load_state_dict(extra["critic"])
            self.critic_opt.load_state_dict(extra["critic_optim"])

    def shutdown(self) -> None:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        super().shutdown()
