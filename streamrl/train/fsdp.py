"""One FSDP2 training rank (a Ray actor): loads the HF model, shards it with `fully_shard`, trains, publishes weights.

Each rank owns an equal contiguous slice of the step's batch and runs it in micro-batches. The loss of a
micro-batch is `masked_sample_mean_sum(L, m) / global_batch_size * world` so that, after FSDP averages gradients
over ranks, the step's gradient is that of the mean over samples of per-sample token means (slime's reduction),
whatever the micro-batch size or the number of ranks.

Three policies (DESIGN.md): behaviour ℓroll comes with the batch; the proximal ℓold is the trainer's own log-prob at
the start of the step. With one optimizer step per batch the trainer's weights have not moved yet when each
micro-batch is first run, so ℓold is the detached ℓθ of that same forward (as slime's `can_reuse_log_probs`): one
forward instead of two, and the PPO ratio is exactly 1 at that point while TIS corrects ℓold / ℓroll.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from streamrl.train.batch import TrainBatch


class FSDPTrainRank:
    """Wrap with `ray.remote`; every public method is called on all ranks at once (they hold collectives)."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int):
        self.args, self.rank, self.world = args, rank, world
        self.model = self.ref_model = self.opt = None

    def master_address(self) -> tuple[str, int]:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return "127.0.0.1", s.getsockname()[1]

    def init(self, master_addr: str, master_port: int) -> dict[str, Any]:
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from transformers import AutoModelForCausalLM

        args = self.args
        torch.manual_seed(args.seed)
        torch.set_num_threads(max(1, args.train_torch_threads))
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        dist.init_process_group("nccl" if cuda else "gloo", rank=self.rank, world_size=self.world)
        mesh = init_device_mesh(self.device.type, (self.world,))
        model = AutoModelForCausalLM.from_pretrained(args.hf_checkpoint, dtype=torch.float32).to(self.device)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                     betas=(args.adam_beta1, args.adam_beta2))
        if args.use_kl_loss:  # frozen reference, kept whole on every rank (small models; sharding it is future work)
            self.ref_model = AutoModelForCausalLM.from_pretrained(args.hf_checkpoint, dtype=torch.float32)
            self.ref_model.to(self.device).eval().requires_grad_(False)
        self.pad_id = model.config.pad_token_id or 0
        return {"rank": self.rank, "device": str(self.device), "params": sum(p.numel() for p in model.parameters())}

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on this rank's slice of `batch`; returns metrics averaged over the global batch."""
        import torch
        import torch.distributed as dist

        from streamrl.algos import masked_sample_mean_sum, policy_loss, reduce_metrics, sft_loss, tis_weights

        args, t0 = self.args, time.time()
        local = batch.shard(self.rank, self.world)
        n_global, mbs = len(batch), args.micro_batch_size
        scale = self.world / n_global
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for start in range(0, len(local), mbs):
            mb = slice(start, start + mbs)
            toks, plen, rlen = local.tokens[mb], local.prompt_lengths[mb], local.response_lengths[mb]
            out = self._log_probs(self.model, toks, plen, rlen, with_entropy=args.entropy_coef > 0)
            mask = self._pad(local.loss_masks[mb], out.mask) * out.mask
            if args.loss_type == "sft_loss":
                loss = sft_loss(out.log_probs, mask)
                metrics = {"logp": out.log_probs.detach()}
            else:
                old = out.log_probs.detach()
                roll = self._pad(local.rollout_log_probs[mb], out.mask)
                weights, tis_m = (tis_weights(old, roll, args.tis_clip, args.tis_clip_low, mask)
                                  if args.use_tis else (None, {}))
                ref = None
                if self.ref_model is not None:
                    with torch.no_grad():
                        ref = self._log_probs(self.ref_model, toks, plen, rlen).log_probs
                adv = torch.tensor(local.advantages[mb], dtype=out.log_probs.dtype, device=out.log_probs.device)
                per_tok, metrics = policy_loss(
                    out.log_probs, old, adv, eps_clip=args.eps_clip, eps_clip_high=args.eps_clip_high,
                    tis_weights=weights, ref_log_probs=ref, kl_loss_coef=args.kl_loss_coef,
                    kl_loss_type=args.kl_loss_type, entropy=out.entropy, entropy_coef=args.entropy_coef,
                )
                metrics["rollout_logprob_abs_diff"] = (old - roll).abs()
                if args.use_tis:
                    metrics["tis_weight"] = weights
                loss = masked_sample_mean_sum(per_tok, mask)
                _ = tis_m  # token-mean TIS stats are recomputed per sample through `metrics` for consistency
            (loss * scale).backward()
            for k, v in reduce_metrics(metrics, mask).items():
                sums[k] = sums.get(k, 0.0) + v
            sums["loss"] = sums.get("loss", 0.0) + loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
        self.opt.step()
        names = sorted(sums)
        vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in names])
        dist.all_reduce(vec)
        result = {k: float(v) / n_global for k, v in zip(names, vec.tolist(), strict=True)}
        result["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        result["train_time"] = time.time() - t0
        return result

    def _log_probs(self, model, toks, plen, rlen, with_entropy: bool = False):
        from streamrl.algos import response_log_probs

        return response_log_probs(model, toks, plen, rlen, temperature=self.args.rollout_temperature,
                                  pad_id=self.pad_id, with_entropy=with_entropy)

    @staticmethod
    def _pad(rows: list[list[float]], like):
        import torch

        out = torch.zeros_like(like)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=like.dtype)
        return out

    def full_named_parameters(self) -> list[tuple[str, Any]] | None:
        """Gather every parameter in full (collective on all ranks); rank 0 gets CPU tensors, others None."""
        gathered = []
        for name, p in self.model.named_parameters():
            t = p.full_tensor() if hasattr(p, "full_tensor") else p.data
            if self.rank == 0:
                gathered.append((name, t.detach().to("cpu", copy=True)))
        return gathered if self.rank == 0 else None

    def publish_weights(self, engine_urls: list[str], version: int) -> dict[str, float]:
        """Gather the full weights and push them to every engine's `/update_weights_from_tensor` (rank 0 sends)."""
        from streamrl.sync.http_tensor import push_named_tensors

        t0 = time.time()
        named = self.full_named_parameters()
        if self.rank != 0:
            return {}
        stats = push_named_tensors(engine_urls, named, version, self.args.update_weight_buffer_size)
        stats["sync_gather_time"] = stats["sync_start"] - t0
        return stats

    def save_hf(self, path: str) -> None:
        named = self.full_named_parameters()
        if self.rank == 0:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(self.args.hf_checkpoint)
            model.load_state_dict(dict(named), strict=False)
            model.save_pretrained(path)
            AutoTokenizer.from_pretrained(self.args.hf_checkpoint).save_pretrained(path)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
