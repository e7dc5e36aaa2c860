"""slime's three Megatron hooks with their signatures; each call is appended to $STREAMRL_TEST_HOOK_LOG."""

import json
import os


def _log(**kw):
    with open(os.environ["STREAMRL_TEST_HOOK_LOG"], "a") as f:
        f.write(json.dumps(kw) + "\n")


def init(args):
    _log(hook="init", backend=args.train_backend)


def before_train_step_hook(args, rollout_id, step_id, model, optimizer, opt_param_scheduler):
    assert isinstance(model, list) and hasattr(optimizer, "step")
    _log(hook="before_train_step_hook", rollout_id=rollout_id, step_id=step_id)


def before_log_prob_hook(args, model, store_prefix):
    assert isinstance(model, list)
    _log(hook="before_log_prob_hook", store_prefix=store_prefix)
