"""slime's synchronous entry point: generate a rollout, train on it, publish the weights, repeat.

    python train.py --hf-checkpoint ckpt --prompt-data train.jsonl --label-key label \
        --rollout-batch-size 8 --n-samples-per-prompt 8 --num-rollout 100 ...

The same flags, plug-ins, metrics, checkpoints and one-line errors as `train_async.py`; the loop is
`pipelines/synchronous.py`: the async pipeline at zero lag (`--max-staleness 0 --update-weights-interval 1`, no
partial rollouts), so every trained token comes from the weights being trained, and engines and trainer take turns.
Use it as slime's `train.py` is used: the on-policy baseline, or when the job is dominated by neither phase.
"""

from __future__ import annotations

from train_async import main

if __name__ == "__main__":
    main(synchronous=True)
