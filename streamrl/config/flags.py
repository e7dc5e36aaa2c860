"""Every command-line flag, declared once: typed dataclasses per concern, argparse generated from them.

Flag names follow slime (and Megatron for model-parallel flags): field `rollout_batch_size` is
`--rollout-batch-size`. Each help text lives here and nowhere else. The parsed result is a flat
`argparse.Namespace` (slime plug-ins read `args.<name>`); `validate(args)` applies the cross-field rules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from streamrl.config.field import F
from streamrl.config.megatron_flags import MegatronConfig
from streamrl.config.speed_flags import TrainSpeedConfig


@dataclass
class ClusterConfig:
    ray_address: str | None = F(None, "Connect to this Ray cluster instead of starting a local one.")
    actor_num_nodes: int = F(1, "Trainer nodes.")
    actor_num_gpus_per_node: int = F(1, "Trainer ranks per node (CPU processes when there is no GPU).")
    rollout_num_gpus: int | None = F(None, "Total GPUs for inference engines (engines = this / per-engine).")
    rollout_num_gpus_per_engine: int = F(1, "GPUs per engine (SGLang tensor parallel size).")
    rollout_num_engines: int | None = F(None, "Number of inference engines (overrides the GPU arithmetic).")
    colocate: bool = F(False, "train.py only: trainer and engines share the GPUs, taking turns. The engines release "
                              "their memory (SGLang's /release_memory_occupation) while the trainer trains, the "
                              "trainer offloads parameters, gradients and optimizer state to the host while they "
                              "generate; weights synced by CUDA IPC. --sglang-mem-fraction-static applies while the "
                              "engine is resident; the trainer gets the whole GPU when it trains.")
    offload: bool | None = F(None, "slime's: --offload-train and --offload-rollout together (with --colocate).")
    offload_train: bool | None = F(None, "--colocate: the trainer offloads parameters, gradients and optimizer "
                                         "state to the host while the engines generate (default on with "
                                         "--colocate, as slime; --no-offload-train keeps it resident when both fit "
                                         "and saves the offload's time).")
    offload_rollout: bool | None = F(None, "--colocate: the engines release their memory while the trainer "
                                           "trains (default on with --colocate, as slime; --no-offload-rollout "
                                           "keeps them resident).")
    train_backend: str = F("fsdp", "Training backend.", choices=["fsdp", "megatron"])
    rollout_engine: str = F("embedded", "Inference engine.", choices=["embedded", "sglang"])
    engine_torch_threads: int = F(1, "torch threads per embedded engine process (CPU).")
    engine_dtype: str | None = F(None, "Embedded engine weights dtype (default: bfloat16 on GPU, float32 on CPU).")
    engine_max_context_len: int = F(1024, "Embedded engine KV cache length per request (GPU slot cache).")
    engine_keep_kv_on_update: bool = F(False, "Embedded engine: requests kept through a weight update (in-place "
                                       "pause) keep the K/V their prefix got from the old weights, as SGLang does "
                                       "(cheaper); by default it is recomputed with the new weights.")
    use_mps: bool = F(False, "Start an NVIDIA MPS control daemon for this job (local Ray cluster, GPU) so that the "
                             "trainer's and the engines' kernels on a shared GPU run concurrently instead of "
                             "time-sliced. streamrl extension.")
    engine_mps_thread_percentage: int | None = F(None, "With --use-mps: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of the "
                                                       "engines (their share of the SMs; the trainer keeps all).")
    train_mps_thread_percentage: int | None = F(None, "With --use-mps: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of the "
                                                      "trainer ranks (leaves the rest of the SMs to the engines).")
    train_mps_low_priority: bool = F(False, "With --use-mps: run the trainer ranks as below-normal priority MPS "
                                            "clients (CUDA_MPS_CLIENT_PRIORITY=1), so that the engines' decode "
                                            "kernels are scheduled first; drivers without MPS client priorities "
                                            "ignore it.")
    update_weight_transport: str = F("auto", "Weight sync transport: auto (CUDA IPC when trainer and engines share "
                                     "a GPU, pinned host memory when they are on different GPUs, msgpack over HTTP "
                                     "on CPU), ipc, pinned (host shared memory), distributed (NCCL broadcasts with "
                                     "SGLang's /update_weights_from_distributed; gloo on CPU; not yet measured on "
                                     "GPUs, hence not auto's choice), http, disk.",
                                     choices=["auto", "http", "ipc", "pinned", "distributed", "disk"])
    use_router: bool = F(False, "Put sglang-router in front of the embedded engines (always on with --rollout-engine "
                                "sglang unless --sglang-router-ip is given); without it producers balance requests.")
    sglang_router_ip: str | None = F(None, "Use this external sglang-router (engines register with it) instead of "
                                           "starting one.")
    sglang_router_port: int | None = F(None, "Port of the external router (with --sglang-router-ip).")
    sglang_router_request_timeout_secs: int = F(14400, "Request timeout of the router streamrl starts.")
    rollout_engine_startup_timeout: float = F(900.0, "Seconds to wait for an SGLang server (or the router) to "
                                                     "answer /health before failing with its last log lines.")
    rollout_health_check_interval: float = F(
        10.0, "slime's: seconds between /health probes of every engine by the producers (0: none). An engine that "
              "does not answer within --rollout-health-check-timeout (frozen), or whose request fails and that then "
              "does not answer (killed), is dropped from routing and weight syncs, logged and counted "
              "(engine_failures); its requests go to the live engines.")
    rollout_health_check_timeout: float = F(20.0, "slime's: seconds an engine has to answer /health before it counts "
                                                  "as dead (slime: 5; longer here because CPU engines on shared "
                                                  "cores answer late under load).")
    use_fault_tolerance: bool = F(False, "slime's: start a replacement for each dead engine; it joins at the next "
                                         "weight sync, on the current weights. Without it the job goes on with "
                                         "the live engines.")
    train_torch_threads: int = F(1, "torch threads per trainer rank (CPU).")
    seed: int = F(1234, "Random seed.")


@dataclass
class DataConfig:
    prompt_data: str | None = F(None, "JSONL file of prompts.")
    input_key: str = F("input", "JSONL key holding the prompt.")
    label_key: str | None = F(None, "JSONL key holding the label.")
    metadata_key: str = F("metadata", "JSONL key holding per-prompt metadata (a dict).")
    apply_chat_template: bool = F(False, "Wrap the prompt with the tokenizer's chat template.")
    rollout_shuffle: bool = F(False, "Shuffle prompts (per epoch).")
    rollout_seed: int = F(42, "Seed for prompt shuffling.")
    rollout_max_prompt_len: int | None = F(None, "Skip prompts longer than this many tokens (counted).")
    eval_prompt_data: list[str] | None = F(None, "Eval datasets as `name path [name path ...]` (a single path is "
                                                 "named after its file); repeatable.", nargs="+", action="extend")
    eval_interval: int | None = F(None, "Evaluate every this many train steps.")
    n_samples_per_eval_prompt: int = F(1, "Samples per eval prompt.")
    log_passrate: bool = F(False, "Eval: also log eval/<name>/pass@k for k = 1, 2, 4, ... up to "
                                  "--n-samples-per-eval-prompt (a sample passes with reward 1; the unbiased "
                                  "estimator 1 - C(n-c, k)/C(n, k), averaged over prompts), as slime.")
    eval_input_key: str | None = F(None, "JSONL key of the eval datasets' prompts (default --input-key).")
    eval_label_key: str | None = F(None, "JSONL key of the eval datasets' labels (default --label-key).")
    eval_reward_key: str | None = F(None, "Key of a dict reward reported by eval (default --reward-key).")
    eval_temperature: float | None = F(None, "Eval sampling temperature (default: rollout temperature).")
    eval_top_p: float | None = F(None, "Eval nucleus sampling p (default: --rollout-top-p).")
    eval_max_response_len: int | None = F(None, "Eval max new tokens (default: --rollout-max-response-len).")
    skip_eval_before_train: bool = F(False, "Do not evaluate before the first train step.")
    eval_function_path: str | None = F(None, "slime `generate_rollout(args, rollout_id, data_source, evaluation=True)` "
                                             "for eval (default: --rollout-function-path if set, else built-in).")
    data_source_path: str | None = F(None, "slime data source class `cls(args)` with get_samples(n) -> groups "
                                           "(default: --prompt-data).")


@dataclass
class RolloutConfig:
    hf_checkpoint: str | None = F(None, "HF model directory: initial weights and tokenizer.")
    num_rollout: int | None = F(None, "Number of rollouts; a rollout is --num-steps-per-rollout train steps.")
    num_epoch: int | None = F(None, "Alternative to --num-rollout: passes over the prompt data.")
    rollout_batch_size: int = F(8, "Prompts (groups) per rollout.")
    n_samples_per_prompt: int = F(8, "Samples per prompt (group size).")
    rollout_max_response_len: int = F(64, "Maximum new tokens per sample.")
    rollout_max_context_len: int | None = F(None, "slime's flag: prompt + response tokens per sample at most; a "
                                                  "sample's new tokens are capped by what is left of it (a prompt "
                                                  "that fills it ends TRUNCATED with no response).")
    rollout_temperature: float = F(1.0, "Sampling temperature (> 0).")
    rollout_top_p: float = F(1.0, "Nucleus sampling p.")
    rollout_top_k: int = F(-1, "Top-k sampling (-1: off).")
    rollout_skip_special_tokens: bool | None = F(None, "Strip special tokens from the response text that rewards "
                                                       "see (slime's flag; its default keeps them, streamrl's "
                                                       "strips them: --no-rollout-skip-special-tokens keeps them). "
                                                       "The trained tokens are the same either way.")
    rollout_stop: list[str] | None = F(None, "Stop strings (SGLang's `stop`): generation ends once the response text "
                                             "contains one; the string is kept in the response (no_stop_trim).",
                                       nargs="*")
    rollout_stop_token_ids: list[int] | None = F(None, "Extra stop token ids.", nargs="*")
    partial_rollout: bool = F(False, "Keep generations aborted by a weight update and resume them.")
    mask_offpolicy_in_partial_rollout: bool = F(False, "Mask the loss on tokens from before a resume.")
    pause_generation_mode: str = F("abort", "How a weight sync pauses the engines (SGLang's /pause_generation mode): "
                                   "abort (in-flight requests return their prefix and are resubmitted) or in_place "
                                   "(they stay in the engine and continue under the new weights; needs "
                                   "--partial-rollout).", choices=["abort", "in_place"])
    sglang_server_concurrency: int = F(64, "Concurrent requests per engine.")
    rollout_max_groups_in_flight: int | None = F(None, "Groups in flight at once (default: async-buffer-size).")
    custom_rm_path: str | None = F(None, "Reward function `async def rm(args, sample) -> float` or a built-in name.")
    rm_type: str | None = F(None, "Built-in rule reward (default: each sample's metadata['rm_type']); remote_rm: "
                                  "POST {prompt, response, label} to --rm-url and train on its JSON answer.")
    rm_url: str | None = F(None, "The reward server of --rm-type remote_rm (slime's; its JSON answer is the reward: "
                                 "a number, or a dict read with --reward-key).")
    reward_key: str | None = F(None, "Key of a dict reward to train on.")
    custom_generate_function_path: str | None = F(None, "`async def generate(args, sample, sampling_params)`.")
    rollout_function_path: str | None = F(None, "slime `generate_rollout(args, rollout_id, data_source, evaluation)`: "
                                                "replaces the streaming producers by rollout-sized batches.")
    group_rm: bool = F(False, "--custom-rm-path is `async def rm(args, samples) -> list[float]`, once per group.")
    custom_reward_post_process_path: str | None = F(
        None, "slime's `fn(args, samples) -> (raw_rewards, rewards)` over a train step's samples (whole groups, in "
              "order): `rewards` replace the built-in group normalisation as the per-sample advantages; "
              "`raw_rewards` are logged.")
    rollout_watchdog_timeout: float | None = F(
        900.0, "Seconds the trainer may wait with no rollout progress (no group settled, no token generated) before "
               "the job stops naming what is stuck (the oldest group and its stage, or the pacing bound). 0: never.")
    rm_timeout: float | None = F(300.0, "Seconds a reward call may take; then the sample is FAILED (a hung reward "
                                        "must not hold its group's admission slot forever). 0: no limit.")
    dynamic_sampling_filter_path: str | None = F(None, "`fn(args, group) -> DynamicFilterOutput | bool`; dropped "
                                                       "groups are `filtered` in the ledger (built-in: "
                                                       "check_reward_nonzero_std).")
    over_sampling_batch_size: int | None = F(None, "Groups per submission of a batch rollout (>= "
                                                   "--rollout-batch-size; default equal).")
    rollout_sample_filter_path: str | None = F(None, "`fn(args, groups)` setting sample.remove_sample before "
                                                     "training.")
    rollout_stream: bool = F(False, "Generate with stream=true (one request per sample): the sample follows every "
                                    "cumulative chunk, so an abort keeps a coherent prefix.")
    max_turns: int | None = F(None, "Turns a multi-turn --custom-generate-function-path may take (slime; the plug-in "
                                    "reads args.max_turns; the built-in generate is single-turn).")
    prefill_num_servers: int | None = F(
        None, "slime's prefill/decode disaggregation: engines for prefill only. Not available in this build: the "
              "embedded engine prefills and decodes in one process, and streamrl does not start SGLang's PD "
              "servers yet (refused with a message).")


@dataclass
class BufferConfig:
    async_buffer_size: int = F(16, "Capacity of the rollout buffer in groups; producers block when it is full.")
    update_weights_interval: int = F(1, "Publish weights to the engines every this many train steps.")
    max_staleness: int = F(1, "Largest allowed policy lag (versions) of a trained group's oldest token.")
    stale_policy: str = F("regenerate", "What to do with a group that went stale.", choices=["drop", "regenerate"])
    buffer_filter_path: str | None = F(None, "`buffer_filter(args, rollout_id, buffer, num_samples)` (slime), or a "
                                       "built-in: fifo (pop_first), lifo, freshest_first, oldest_version_first, "
                                       "prioritized.")
    buffer_priority: str = F("reward_std", "Score of the prioritized buffer filter.",
                             choices=["reward_std", "abs_advantage", "recency"])
    async_buffer_max_tokens: int | None = F(None, "Also bound the tokens (prompt + response) queued in the buffer.")
    max_reuse: int = F(1, "Times a group may be trained (replay, within --max-staleness); 1 = no reuse.")


@dataclass
class AlgoConfig:
    advantage_estimator: str = F("grpo", "Advantage estimator.", choices=[
        "grpo", "gspo", "cispo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo",
        "on_policy_distillation"])
    disable_grpo_std_normalization: bool = F(False, "GRPO: subtract the group mean only.")
    disable_rewards_normalization: bool = F(False, "Use raw rewards as advantages.")
    normalize_advantages: bool = F(False, "Whiten advantages over all tokens of the step (required by REINFORCE++).")
    gamma: float = F(1.0, "Discount (reinforce_plus_plus returns, PPO GAE).")
    lambd: float = F(1.0, "GAE lambda (ppo).")
    kl_coef: float = F(0.0, "KL reward shaping -kl_coef*KL(pi_old||pi_ref) per token (ppo, reinforce_plus_plus*).")
    value_clip: float = F(0.2, "PPO critic: clip the value update to +-value_clip around the old value.")
    critic_lr: float | None = F(None, "PPO critic learning rate (default --lr).")
    num_critic_only_steps: int = F(0, "PPO: train only the critic for the first this many steps.")
    use_opd: bool = F(False, "On-policy distillation: A -= opd_kl_coef*(logp_student - logp_teacher).")
    opd_kl_coef: float = F(1.0, "On-policy distillation coefficient.")
    opd_teacher_load: str | None = F(None, "HF checkpoint of the distillation teacher (loaded in the trainer).")
    custom_advantage_function_path: str | None = F(
        None, "`fn(args, rollout_data)` filling rollout_data['advantages'] and ['returns'] (per-sample tensors).")
    loss_type: str = F("policy_loss", "Loss.", choices=["policy_loss", "sft_loss", "custom_loss"])
    custom_loss_function_path: str | None = F(
        None, "`fn(args, batch, reduce) -> (loss, metrics)` for --loss-type custom_loss (see "
              "streamrl/train/objective.py).")
    calculate_per_token_loss: bool = F(False, "Reduce the loss as a token mean over the whole step (all ranks).")
    loss_normalizer_constant: float | None = F(
        None, "Dr. GRPO: divide each sample's token-sum loss by this constant (e.g. the max response length).")
    eps_clip: float = F(0.2, "PPO clip range.")
    eps_clip_high: float | None = F(None, "Upper clip range (DAPO clip-higher); default --eps-clip.")
    eps_clip_c: float | None = F(None, "Dual-clip PPO: bound the loss of negative-advantage tokens by c*|A| (c > 1).")
    only_train_params_name_list: list[str] | None = F(None, "slime's: train only the parameters whose names match "
                                                              "one of these regular expressions (re.search; HF names "
                                                              "under fsdp, Megatron names under megatron).")
    freeze_params_name_list: list[str] | None = F(None, "slime's: freeze the parameters whose names match one of "
                                                          "these regular expressions.")
    use_kl_loss: bool = F(False, "Add a KL penalty to a frozen reference model.")
    ref_load: str | None = F(None, "Reference model for --use-kl-loss / --kl-coef (slime's flag): an HF checkpoint "
                                   "directory, or with --train-backend megatron also a Megatron checkpoint "
                                   "(torch_dist or torch) of --hf-checkpoint's architecture. Default: "
                                   "--hf-checkpoint.")
    kl_loss_coef: float = F(0.0, "KL loss coefficient.")
    reset_optimizer_states: bool = F(False, "slime's: every train step (rollout) starts the policy's optimizer from "
                                            "fresh state (Adam's moments and step count).")
    ref_update_interval: int | None = F(None, "slime's: the reference model takes the policy's weights every this "
                                              "many train steps (checkpoints keep the reference then).")
    kl_loss_type: str = F("low_var_kl", "KL estimator.", choices=["k1", "k2", "k3", "low_var_kl"])
    use_unbiased_kl: bool = F(False, "With --use-kl-loss: multiply each token's KL estimate by the importance ratio "
                                     "pi_theta/pi_old = exp(logp - logp_old) (DeepSeek-V3.2), which makes the "
                                     "KL loss's gradient that of KL(pi_theta || pi_ref) also off-policy.")
    entropy_coef: float = F(0.0, "Entropy bonus coefficient.")
    use_tis: bool | None = F(None, "Importance-weight tokens by pi_old / pi_rollout (TIS, slime's opt-in); unset, "
                                   "any --tis-* flag away from its default turns it on. Without TIS (and without "
                                   "--disable-tis) streamrl corrects with --use-rollout-logprobs (docs/offpolicy.md).")
    disable_tis: bool = F(False, "No off-policy correction at all: neither TIS nor the default "
                                 "--use-rollout-logprobs (async training then needs --allow-uncorrected-offpolicy).")
    tis_clip: float = F(2.0, "TIS upper clip.")
    tis_clip_low: float = F(0.0, "TIS lower clip.")
    tis_level: str = F("token", "Importance ratio per token, per sequence (product) or geometric mean.",
                       choices=["token", "sequence", "geometric"])
    tis_mode: str = F("truncate", "truncate: clamp the ratio; mask: drop tokens outside [--tis-clip-low, "
                                  "--tis-clip] from the whole loss (policy, KL and entropy terms). IcePop proper "
                                  "masks the policy term only: --custom-tis-function-path icepop.",
                      choices=["truncate", "mask"])
    custom_tis_function_path: str | None = F(
        None, "slime TIS plug-in `fn(args, *, pg_loss, train_log_probs, rollout_log_probs, loss_masks, ...)`; "
              "built-ins: vanilla, icepop.")
    use_rs: bool = F(False, "Rejection sampling (slime's MIS example, mis.py): tokens whose pi_old/pi_rollout at "
                            "--rs-level lies outside [--rs-lower-bound, --rs-upper-bound] leave the loss numerators "
                            "(their denominators stay); turns TIS on.")
    rs_level: str = F("token", "Ratio --use-rs tests: per token, per sequence (product) or geometric mean.",
                      choices=["token", "sequence", "geometric"])
    rs_lower_bound: float | None = F(None, "--use-rs lower bound; default --tis-clip-low, or 1/--tis-clip when that "
                                           "is 0 (slime's defaults).")
    rs_upper_bound: float | None = F(None, "--use-rs upper bound; default --tis-clip.")
    rs_veto_threshold: float | None = F(None, "Veto (slime's MIS example): a sample with a loss token whose "
                                              "pi_old/pi_rollout is below this leaves the loss numerators whole "
                                              "(slime's mis.yaml: 1e-4); turns TIS on.")
    tis_batch_normalize: bool = F(False, "Rescale the TIS weights to mean 1 over each micro-batch (slime's MIS "
                                         "example: what one call sees, so the factor depends on --micro-batch-size); "
                                         "--tis-level token or sequence; turns TIS on.")
    tis_threshold: float | None = F(None, "Not a slime flag: slime's source (THUDM/slime, its whole history) has no "
                                          "--tis-threshold, only third-party summaries of its docs name it; the TIS "
                                          "bounds are --tis-clip and --tis-clip-low (refused with that message).")
    use_opsm: bool = F(False, "Off-Policy Sequence Masking (slime, DeepSeek-V3.2): the negative-advantage tokens of a "
                              "sample whose mean (log pi_old - log pi_theta) over its loss tokens exceeds "
                              "--opsm-delta leave the policy loss.")
    opsm_delta: float = F(1e-4, "--use-opsm threshold on each sample's KL estimate.")
    use_rollout_logprobs: bool = F(False, "Use the engine's log-probs as pi_old: the PPO ratio and clip are anchored "
                                          "at the behaviour policy. streamrl's default correction when no TIS flag "
                                          "is given (measured by scripts/bench/staleness_sweep.py, "
                                          "docs/offpolicy.md).")
    m2_threshold: float | None = F(None, "M2 trust region (M2PO, AReaL's m2_threshold): drop the tokens with the "
                                         "largest (log pi_prox - log pi_rollout)^2 until the batch's mean over the "
                                         "kept tokens is below this (M2PO uses 0.04); off when unset.")
    staleness_decay: float = F(1.0, "Multiply each sample's policy loss by this to the power of its staleness "
                                    "(versions): stale groups count less; 1 = off.")
    allow_uncorrected_offpolicy: bool = F(False, "Allow --max-staleness > 0 with no off-policy correction.")
    true_on_policy_mode: bool = F(False, "Recompute pi_old exactly as the embedded engine decodes (bit-identical "
                                         "on CPU fp32 when the engine runs one request at a time).")


@dataclass
class TrainConfig:
    global_batch_size: int | None = F(None, "Samples per optimizer step (default: rollout batch / steps).")
    micro_batch_size: int = F(1, "Samples per forward/backward on one rank.")
    balance_data: bool = F(False, "slime's flag: give every data-parallel rank the same number of samples with "
                                  "near-equal token totals (longest first to the lightest rank) instead of contiguous "
                                  "slices; the loss is a global sum, so the step's gradient does not change.")
    use_dynamic_batch_size: bool = F(False, "Form micro-batches by token budget (--max-tokens-per-gpu) instead of "
                                            "--micro-batch-size samples, longest first (less padding).")
    max_tokens_per_gpu: int | None = F(None, "With --use-dynamic-batch-size: padded tokens (samples x longest "
                                             "prompt+response) per micro-batch on one rank.")
    log_probs_chunk_size: int = F(-1, "slime's flag: compute the trainer's log-probs and entropies through the LM "
                                      "head this many response tokens at a time (backward recomputes each chunk), "
                                      "never materialising [tokens, vocab] fp32 logits; -1: the plain full-logits "
                                      "path.")
    num_steps_per_rollout: int = F(1, "Optimizer steps per rollout: train steps of rollout/n samples, each with "
                                      "pi_prox recomputed (for several steps against one pi_prox: "
                                      "--num-mini-batches).")
    num_mini_batches: int = F(1, "Optimizer steps per train step: the step's batch is split into this many equal "
                                 "parts, one optimizer step each, all against pi_prox recomputed once before the "
                                 "first (AReaL's ppo_n_minibatches). With 1, pi_theta = pi_prox at the step and the "
                                 "PPO clip is inert; > 1 makes it a trust region around pi_prox (decoupled PPO).")
    lr: float = F(1e-6, "Learning rate (peak, with a schedule).")
    lr_decay_style: str = F("constant", "Megatron's: learning-rate decay after the warm-up "
                                        "(streamrl/train/schedule.py).", choices=["constant", "linear", "cosine"])
    lr_warmup_iters: int = F(0, "Megatron's: optimizer steps of linear warm-up from --lr-warmup-init to --lr.")
    lr_warmup_init: float = F(0.0, "Megatron's: learning rate at the start of the warm-up.")
    lr_decay_iters: int | None = F(None, "Megatron's: steps over which the rate decays to --min-lr (default: the "
                                         "job's train steps).")
    min_lr: float = F(0.0, "Megatron's: learning rate at the end of the decay.")
    optimizer: str = F("adam", "Megatron's: adam (AdamW with --weight-decay, --adam-beta1/2) or sgd (momentum "
                               "--sgd-momentum).", choices=["adam", "sgd"])
    sgd_momentum: float = F(0.9, "Megatron's: SGD momentum.")
    recompute_granularity: str | None = F(None, "Megatron's: `full` recomputes each decoder layer's activations in "
                                                "backward (activation checkpointing: less memory, one more "
                                                "forward).", choices=["full"])
    weight_decay: float = F(0.0, "AdamW weight decay.")
    adam_beta1: float = F(0.9, "AdamW beta1.")
    adam_beta2: float = F(0.999, "AdamW beta2.")
    clip_grad: float = F(1.0, "Gradient norm clip.")
    bf16: bool = F(False, "Train in bf16 mixed precision (Megatron's flag): bf16 parameters and matmuls in the "
                          "forward/backward, fp32 master weights, optimizer and gradient reduction (FSDP2 "
                          "MixedPrecisionPolicy). Default: fp32 (TF32 matmuls on GPU).")
    tensor_model_parallel_size: int = F(1, "Megatron tensor parallel size.")
    pipeline_model_parallel_size: int = F(1, "Megatron pipeline parallel size.")
    save: str | None = F(None, "Directory to save the final HF model to; with --save-interval also the checkpoint "
                               "directory (<save>/step_<k>/, `latest` names the newest).")
    save_interval: int | None = F(None, "Write a resumable checkpoint to --save every this many train steps (and "
                                        "at the end).")
    save_hf: str | None = F(None, "slime's: also export the policy as an HF checkpoint with every --save-interval "
                                  "checkpoint (or once at the end without it), to this path; {rollout_id} in it "
                                  "becomes the train step (e.g. out/hf/iter_{rollout_id}).")
    load: str | None = F(None, "Resume from the latest checkpoint in this directory (written by --save-interval).")
    ckpt_step: int | None = F(None, "With --load: resume from step_<k> instead of the latest checkpoint (Megatron's "
                                    "--ckpt-step).")
    keep_latest_k: int = F(0, "Keep only the newest this many checkpoints in --save (torchtitan's "
                              "checkpoint.keep_latest_k; slime and Megatron keep all): older step_<k>/ are deleted "
                              "once a new one is complete and `latest` names it. 0: keep every checkpoint.")
    update_weight_buffer_size: int = F(512 * 1024**2, "Bytes per weight-sync bucket.")
    check_weight_update_equal: bool = F(False, "After the last sync, check engine weights equal the trainer's.")


@dataclass
class LogConfig:
    run_dir: str | None = F(None, "Where metrics.jsonl and plots go (default: runs/<time>).")
    use_wandb: bool = F(False, "Log to Weights & Biases.")
    wandb_mode: str = F("offline", "wandb mode.", choices=["offline", "online", "disabled"])
    wandb_project: str = F("streamrl", "wandb project.")
    wandb_group: str | None = F(None, "wandb group (slime: a random suffix is appended; the run is named after it).")
    wandb_team: str | None = F(None, "wandb entity (team or user).")
    wandb_host: str | None = F(None, "wandb server URL (self-hosted); with --wandb-key, logs in there.")
    wandb_key: str | None = F(None, "wandb API key (else WANDB_API_KEY or a prior `wandb login`; offline needs none).")
    wandb_dir: str | None = F(None, "Where wandb writes its files (default: the run directory).")
    wandb_run_id: str | None = F(None, "Resume this wandb run id (default: a resumed job, --load, continues the run "
                                       "id saved in its --run-dir).")
    disable_wandb_random_suffix: bool = F(False, "slime's flag: use --wandb-group as is, without a random suffix.")
    wandb_always_use_train_step: bool = F(False, "slime's flag; streamrl always logs against the train step "
                                                 "(evals at the step they started).")
    log_interval: int = F(1, "Print a status line every this many steps.")
    debug: bool = F(False, "Show the Python traceback of a user error (flag, file, plug-in) instead of one "
                           "`streamrl: error:` line (also STREAMRL_DEBUG=1).")
    save_debug_rollout_data: str | None = F(
        None, "slime's flag: write what each train step consumed (its groups and weight version) to this path, "
              "formatted with {rollout_id} (the 0-based step), for --load-debug-rollout-data.")
    debug_rollout_only: bool = F(False, "slime's flag: generate and consume rollouts with no trainer (no training, no "
                                        "weight sync, no staleness bound): measures generation, or with "
                                        "--save-debug-rollout-data records data for --load-debug-rollout-data.")
    load_debug_rollout_data: str | None = F(
        None, "slime's flag: train --num-rollout steps on files written by --save-debug-rollout-data (same "
              "template) with no engines and no weight sync (slime's --debug-train-only); pipelines/debug_train.py.")
    debug_train_only: bool = F(False, "slime's flag: train with no engines, on --load-debug-rollout-data's files "
                                      "(which implies it).")


GROUPS: dict[str, type] = {
    "cluster": ClusterConfig,
    "data": DataConfig,
    "rollout": RolloutConfig,
    "buffer": BufferConfig,
    "algorithm": AlgoConfig,
    "train": TrainConfig,
    "train speed": TrainSpeedConfig,
    "megatron": MegatronConfig,
    "logging": LogConfig,
}


def all_fields() -> list[dataclasses.Field]:
    return [f for cls in GROUPS.values() for f in dataclasses.fields(cls)]
