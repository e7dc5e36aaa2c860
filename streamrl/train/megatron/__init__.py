"""`--train-backend megatron`: Megatron-core GPTModel ranks behind the same `TrainerBackend` interface as FSDP.

convert.py     HF <-> Megatron state dicts (Qwen3, Llama): QKV and gate/up fusion, vocabulary padding, TP shards
arch.py        the model's shape from the HF config and Megatron's flags, checked against each other (preflight too)
model.py       GPTModel from Megatron's flags and the HF config; the HF-like wrapper the RL step runs
parallel.py    torch.distributed and Megatron's process groups
rank.py        one rank (Ray actor): the FSDP rank's step and sync over the GPTModel, slime's hooks
group.py       the ranks as one TrainerBackend
checkpoint.py  Megatron's checkpoint layout (iter_XXXXXXX/mp_rank_XX, latest_checkpointed_iteration.txt)
"""
