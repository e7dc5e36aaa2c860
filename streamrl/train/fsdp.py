"""One FSDP2 training rank (a Ray actor): loads the HF model(s), shards them with `fully_shard`, trains, publishes.

Each rank owns an equal contiguous slice of the step's batch and runs it in micro-batches (`step.py`). Every loss
is a sum divided by GLOBAL constants (`streamrl/algos/reduce.py`), and each rank backpropagates loss·W, so after
FSDP averages gradients over the W ranks the step's gradient is that of the whole batch, whatever the
micro-batch size or the number of ranks. The objective (behaviour µ / proximal π_old / current π_θ) is documented
in `streamrl/train/objective.py`.

Models on a rank: the policy (FSDP), a frozen reference (--use-kl-loss or --kl-coef), a frozen distillation
teacher (--use-opd, --opd-teacher-load) and, for --advantage-estimator ppo, the critic (FSDP, own optimizer,
`critic.py`). Frozen models are kept whole on every rank (small models; sharding them is future work).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamrl.algos import BUILTIN_TIS_FUNCTIONS, bucket_means
from streamrl.algos.logprobs import use_chunked_log_probs
from streamrl.net import free_port
from streamrl.plugins import load_function
from streamrl.sync.select import resolve, stage
from streamrl.train.batch import TrainBatch
from streamrl.train.critic import ValueModel
from streamrl.train.freeze import freeze_params
from streamrl.train.kernels import attention_options, speed_up
from streamrl.train.offload import RankOffload
from streamrl.train.onpolicy import engine_replay_log_probs
from streamrl.train.optim import build_optimizer, local_optimizer
from streamrl.train.schedule import lr_at
from streamrl.train.step import StepRunner, micro_batches, staleness_histogram, token_budget_groups

logger = logging.getLogger("streamrl.train")
PACKED_CHUNK = 2048  # response tokens per LM-head chunk with --qkv-format thd and no --log-probs-chunk-size


class FSDPTrainRank(RankOffload):
    """Wrap with `ray.remote`; every public method is called on all ranks at once (they hold collectives)."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int):
        self.args, self.rank, self.world = args, rank, world
        # the data-parallel position the step shards the batch by and reduces over (FSDP: every rank; the Megatron
        # rank narrows it to its data-parallel group, its TP peers holding the same samples)
        self.dp_rank, self.dp_size, self.dp_group = rank, world, None
        self.model = self.ref_model = self.teacher = self.critic = self.opt = self.critic_opt = None
        self.steps_done = 0
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite grad norm
        self._staged = None  # sync phase 2, between stage_weights and push_staged
        self.shares_gpu = True
        self.packed = args.qkv_format == "thd"  # micro-batches as packed streams (the Megatron rank may say no)

    def master_address(self) -> tuple[str, int]:
        """Where rank 0 hosts torch.distributed's rendezvous (this machine: the ranks are local Ray actors)."""
        return "127.0.0.1", free_port()

    def init(self, master_addr: str, master_port: int, memory_fraction: float | None = None,
             shares_gpu: bool = True) -> dict[str, Any]:
        """Build the models and the process group. `memory_fraction`: this rank's share of a GPU it shares with
        engines (torch's per-process limit, so that the trainer fails with OOM instead of starving them)."""
        args = self.args
        self.shares_gpu = shares_gpu  # with the engines (picks the weight transport)
        self._init_process(master_addr, master_port, memory_fraction)
        mesh = init_device_mesh(self.device.type, (self.world,))

        # --bf16: bf16 parameters/compute in forward and backward, fp32 master weights, optimizer and reduction
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else None
        opts = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}

        def shard(m, layers):
            for layer in layers:
                fully_shard(layer, **opts)
            fully_shard(m, **opts)
            return m

        # --log-probs-chunk-size (and --qkv-format thd): the LM head scores responses in chunks (algos/logprobs.py)
        chunk = args.log_probs_chunk_size if args.log_probs_chunk_size > 0 else 0
        chunk = chunk or (PACKED_CHUNK if args.qkv_format == "thd" else 0)
        attn = attention_options(args)  # --attn-implementation

        def build(m):  # the head, then --use-liger-kernel / --use-torch-compile (kernels.py)
            if chunk:
                use_chunked_log_probs(m, chunk)
            return speed_up(args, m, m.model.layers)

        def frozen(path):
            m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if args.bf16 else torch.float32, **attn)
            return build(m.to(self.device).eval().requires_grad_(False))

        model = build(AutoModelForCausalLM.from_pretrained(args.hf_checkpoint, dtype=torch.float32, **attn
                                                           ).to(self.device))
        if args.recompute_granularity == "full":  # Megatron's full recompute = checkpointing every decoder layer
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.frozen_params = freeze_params(model.named_parameters(), args.only_train_params_name_list,
                                           args.freeze_params_name_list)  # before sharding: HF names
        self.model = shard(model, model.model.layers)
        self.opt = self._optimizer([p for p in model.parameters() if p.requires_grad])
        if args.use_kl_loss or args.kl_coef > 0:
            self.ref_model = frozen(args.ref_load or args.hf_checkpoint)
        if args.use_opd or args.advantage_estimator == "on_policy_distillation":
            self.teacher = frozen(args.opd_teacher_load)
        if args.advantage_estimator == "ppo":
            critic = ValueModel.from_pretrained(args.hf_checkpoint, **attn).to(self.device)
            speed_up(args, critic.backbone, critic.backbone.layers)
            self.critic = shard(critic, critic.backbone.layers)
            self.critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr or args.lr,
                                                weight_decay=args.weight_decay,
                                                betas=(args.adam_beta1, args.adam_beta2))
        self.pad_id = model.config.pad_token_id or 0
        self.runner = self._runner()
        return {"rank": self.rank, "device": str(self.device), "params": sum(p.numel() for p in model.parameters())}

    def _init_process(self, master_addr: str, master_port: int, memory_fraction: float | None) -> None:
        """Seed, threads, this rank's device (and its memory share), the default process group."""
        torch.manual_seed(self.args.seed)
        torch.set_num_threads(max(1, self.args.train_torch_threads))
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        if cuda and memory_fraction:
            torch.cuda.set_per_process_memory_fraction(memory_fraction, self.device)
        if cuda:  # TF32 matmuls for the fp32 master weights (as Megatron/slime train in mixed precision)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        dist.init_process_group("nccl" if cuda else "gloo", rank=self.rank, world_size=self.world)

    def _optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The policy's optimizer (--optimizer; FSDP2 shards its state with the parameters)."""
        return build_optimizer(self.args, params)

    def _runner(self):
        a = self.args

        def all_reduce(t):
            t = t.clone()
            dist.all_reduce(t, group=self.dp_group)
            return t

        def plug(spec, what, builtins=None):
            return load_function(spec, builtins, what) if spec else None

        return StepRunner(
            a, self.model, ref_model=self.ref_model, teacher=self.teacher, critic=self.critic, pad_id=self.pad_id,
            world=self.dp_size, all_reduce=all_reduce,
            tis_fn=plug(a.custom_tis_function_path, "--custom-tis-function-path", BUILTIN_TIS_FUNCTIONS),
            custom_loss_fn=plug(a.custom_loss_function_path, "--custom-loss-function-path"),
            custom_adv_fn=plug(a.custom_advantage_function_path, "--custom-advantage-function-path"),
            replay_fn=engine_replay_log_probs, packed=self.packed,
        )

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One train step (--num-mini-batches optimizer steps) on this rank's slice of `batch`; returns metrics of
        the global batch (averaged over the mini-batches).

        Keys: loss, pg_loss, pg_clipfrac, ppo_kl, ois (mean π_θ/π_old), entropy, tis (mean π_old/µ), tis_clipfrac,
        tis_abs, tis_rejected_frac, train_rollout_logprob_abs_diff (mean |ℓtrainer − ℓroll|), kl_loss (with
        --use-kl-loss), opsm_clipfrac (--use-opsm), mis_rs_* / mis_batch_norm_factor (--use-rs, --rs-veto-threshold,
        --tis-batch-normalize),
        value_loss / value_clipfrac / values / returns (ppo), staleness_hist/k, grad_norm, train_time, and per
        staleness bucket k: mismatch/s{k}/{ratio, abs_diff, kl, clipfrac, rejected, tis_clipfrac} (π_prox/µ,
        |ℓprox − ℓµ|, KL(µ‖π_prox), PPO clip, rejected and TIS-truncated token fractions).
        """
        args, t0, runner = self.args, time.time(), self.runner
        # --num-mini-batches: equal parts of the global batch, each sharded over the ranks, one optimizer step each;
        # π_prox (ℓold), advantages and the M2 mask are computed once, for all of them, before the first step
        parts = batch.mini_batches(args.num_mini_batches)
        per_part = [self._micro_batches(p.shard(self.dp_rank, self.dp_size, balance=args.balance_data)) for p in parts]
        mbs = [mb for part in per_part for mb in part]
        t_prep = time.time()
        runner.prepare(mbs)
        runner.compute_advantages(mbs)
        runner.apply_m2(mbs)
        sums: dict[str, torch.Tensor] = {}
        critic_sums: dict[str, torch.Tensor] = {}
        result: dict[str, float] = {}
        if self.critic is not None:
            self.critic.train()
            self.critic_opt.zero_grad(set_to_none=True)
            critic_sums = runner.critic_backward(mbs, runner.reducer(mbs, batch.num_rollouts()))
            result["critic_grad_norm"] = _norm(torch.nn.utils.clip_grad_norm_(self.critic.parameters(),
                                                                             args.clip_grad))
            self.critic_opt.step()
        self.model.train()
        t_fwd = time.time()
        result["lr"] = lr_at(self.steps_done, lr=args.lr, style=args.lr_decay_style, warmup=args.lr_warmup_iters,
                             warmup_init=args.lr_warmup_init, decay_iters=args.lr_decay_iters, min_lr=args.min_lr)
        for group in self.opt.param_groups:  # the schedule's rate for this step (streamrl/train/schedule.py)
            group["lr"] = result["lr"]
        norms = []

        def opt_step() -> None:
            norm = _norm(self._clip_grad_norm())
            norms.append(norm)
            if not math.isfinite(norm):  # the same total norm on every rank: all skip together, weights stay sane
                self.skipped_steps += 1
                logger.warning("optimizer step skipped: non-finite grad norm %s (%d skipped so far)", norm,
                               self.skipped_steps)
            elif self.steps_done >= args.num_critic_only_steps:
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)

        self.opt.zero_grad(set_to_none=True)
        if args.reset_optimizer_states:  # slime's: every train step starts from fresh moments and step count
            local_optimizer(self.opt).state.clear()
        sums.update(runner.actor_steps(per_part, [p.num_rollouts() for p in parts], opt_step))
        result["grad_norm"] = sum(norms) / len(norms)
        result["skipped_optimizer_steps"] = self.skipped_steps
        t_opt = t_end_bwd = time.time()
        self.steps_done += 1
        self._maybe_refresh_ref()
        # each part's actor metrics are means over that part: average them (bucket sums and the critic's are exact)
        div = {k: 1 if k.startswith("mismatch_sum/") else len(parts) for k in sums}
        sums.update(critic_sums)
        names = sorted(sums)
        vec = torch.stack([sums[k].to(self.device) for k in names])
        dist.all_reduce(vec, group=self.dp_group)
        reduced = {k: float(v) / div.get(k, 1) for k, v in zip(names, vec.tolist(), strict=True)}
        result.update(bucket_means(reduced))
        result.update(staleness_histogram(batch.staleness, args.max_staleness))
        t_end = time.time()  # the metrics' .tolist() waited for the optimizer
        # where the step went: batch to micro-batches, no-grad prepare + critic, actor forward/backward + optimizer
        # steps, metrics
        result.update(train_batch_time=t_prep - t0, train_prepare_time=t_fwd - t_prep,
                      train_fwd_bwd_time=t_end_bwd - t_fwd, train_optimizer_time=t_end - t_opt, train_time=t_end - t0)
        return result

    def _clip_grad_norm(self) -> Any:
        """Clip the policy's gradients to --clip-grad; their total norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)

    def _micro_batches(self, local: TrainBatch) -> list:
        args = self.args
        budget = args.max_tokens_per_gpu if args.use_dynamic_batch_size else None
        packed = self.packed  # the budget counts real tokens, not padded ones
        n_mb = 0
        if budget and self.world > 1:  # every rank runs as many forwards as the rank that needs the most
            mine = len(token_budget_groups([p + r for p, r in zip(local.prompt_lengths, local.response_lengths,
                                                                   strict=True)], budget, packed=packed))
            n = torch.tensor([mine], device=self.device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            n_mb = int(n.item())
        return micro_batches(local, args.micro_batch_size, self.device, max_tokens=budget, min_micro_batches=n_mb,
                             packed=packed)

    def full_named_parameters(self, keep_on_device: bool = False, all_ranks: bool = False
                              ) -> list[tuple[str, Any]] | None:
        """Gather every parameter in full (collective on all ranks); rank 0 (every rank with `all_ranks`) gets CPU
        tensors (device ones with `keep_on_device`), the others None."""
        gathered = []
        for name, p in self.model.named_parameters():
            if not hasattr(p, "full_tensor"):
                t = p.data
            elif self.world == 1:
                t = p.to_local()  # the whole tensor already: no gather, no copy
            else:
                t = p.full_tensor()
            if self.rank == 0 or all_ranks:
                gathered.append((name, t.detach() if keep_on_device else t.detach().to("cpu", copy=True)))
        return gathered if self.rank == 0 or all_ranks else None

    def _maybe_refresh_ref(self) -> None:
        """slime's --ref-update-interval: every N train steps the reference model takes the policy's weights (all
        ranks: the frozen models are whole on each)."""
        n = self.args.ref_update_interval
        if self.ref_model is None or not n or self.steps_done % n:
            return
        ref = dict(self.ref_model.named_parameters())
        with torch.no_grad():
            for name, t in self.full_named_parameters(keep_on_device=True, all_ranks=True):
                ref[name].copy_(t)

    def _ref_state(self) -> dict[str, Any]:
        """The reference model's weights when --ref-update-interval changes them (a resume restores them)."""
        if self.ref_model is None or not self.args.ref_update_interval:
            return {}
        return {"ref": {k: v.detach().to("cpu", copy=True) for k, v in self.ref_model.state_dict().items()}}

    def stage_weights(self, version: int) -> dict[str, float]:
        """Sync phase 1 (collective): gather the full weights and stage them for the transport (rank 0) while the
        engines still generate; `push_staged` sends them once the engines are paused."""

        t0 = time.time()
        transport = resolve(self.args, self.device.type == "cuda", self.shares_gpu)
        named = self.full_named_parameters(keep_on_device=transport in ("ipc", "pinned", "distributed"))
        if self.rank != 0:
            return {}
        t1 = time.time()
        self._staged = stage(self.args, transport, named, version)
        return {"sync_gather_time": t1 - t0, "sync_pack_time": time.time() - t1, "sync_transport": transport}

    def push_staged(self, engine_urls: list[str]) -> dict[str, float]:
        if self.rank != 0:
            return {}
        staged, self._staged = self._staged, None
        if staged is None:
            raise RuntimeError("push_staged without stage_weights")
        return staged(engine_urls)

    def save_hf(self, path: str) -> None:
        named = self.full_named_parameters()
        if self.rank == 0:

            model = AutoModelForCausalLM.from_pretrained(self.args.hf_checkpoint)
            model.load_state_dict(dict(named), strict=False)
            model.save_pretrained(path)
            AutoTokenizer.from_pretrained(self.args.hf_checkpoint).save_pretrained(path)

    def save_state(self, path: str) -> None:
        """Write model + optimizer (and critic) as full state dicts to `path` (collective; rank 0 writes, via a
        temp file and a rename). Loadable on any number of ranks by `load_state`."""

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state: dict[str, Any] = {"steps_done": self.steps_done, **self._ref_state()}
        for key, model, opt in (("policy", self.model, self.opt), ("critic", self.critic, self.critic_opt)):
            if model is not None:
                state[key], state[key + "_optim"] = get_state_dict(model, opt, options=opts)
        if self.rank == 0:
            tmp = f"{path}.tmp"
            torch.save(state, tmp)
            os.replace(tmp, path)

    def load_state(self, path: str) -> None:
        """Restore what `save_state` wrote (every rank reads the file and keeps its own shards)."""

        state = torch.load(path, map_location="cpu", weights_only=False)
        opts = StateDictOptions(full_state_dict=True)
        for key, model, opt in (("policy", self.model, self.opt), ("critic", self.critic, self.critic_opt)):
            if model is not None:
                set_state_dict(model, opt, model_state_dict=state[key], optim_state_dict=state[key + "_optim"],
                               options=opts)
        self.steps_done = int(state["steps_done"])
        if "ref" in state and self.ref_model is not None:
            self.ref_model.load_state_dict(state["ref"])

    def shutdown(self) -> None:

        if dist.is_initialized():
            dist.destroy_process_group()


def _norm(x) -> float:
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)
