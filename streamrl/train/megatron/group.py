"""`--train-backend megatron`: the Megatron ranks as one `TrainerBackend` (the FSDP group's calls, other ranks)."""

from __future__ import annotations

from streamrl.train.group import TrainerGroup
from streamrl.train.megatron.rank import MegatronTrainRank


class MegatronTrainerGroup(TrainerGroup):
    rank_class = MegatronTrainRank
