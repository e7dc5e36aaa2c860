"""Producers with slime's plug-ins: reward failures, group RM, dynamic sampling, rollout functions, data sources,
eval datasets, and plug-in paths that name what failed. One in-process embedded engine; no Ray."""

import inspect
import json
from pathlib import Path

import anyio
import pytest

from buffers.queue import RolloutBuffer
from streamrl.config import default_args
from streamrl.rollout.manager import RolloutManager
from streamrl.types import Status

P = "tests/plugins/rollout_plugins.py:"
ROOT = Path(__file__).resolve().parents[1]


class Local:
    """`actor.method.remote(...)` over a plain object, awaitable like a Ray ObjectRef."""

    def __init__(self, obj):
        self.obj = obj

    def __getattr__(self, name):
        fn = getattr(self.obj, name)

        class Method:
            @staticmethod
            def remote(*a, **kw):
                out = fn(*a, **kw)
                if inspect.isawaitable(out):
                    return out

                async def done():
                    return out

                return done()

        return Method


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from streamrl.engine.actor import EmbeddedEngine

    with EmbeddedEngine(tiny_ckpt, max_running_requests=32) as eng:
        yield eng.url


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"input": f"sort:{d}=", "label": "".join(sorted(d)),
                                        "metadata": {"rm_type": "sort"}}) + "\n" for d in ("321", "54", "9", "87")))
    return str(path)


def make(tiny_ckpt, prompts, engine, **kw):
    kw = {"hf_checkpoint": tiny_ckpt, "prompt_data": prompts, "label_key": "label", "n_samples_per_prompt": 2,
          "rollout_batch_size": 2, "rollout_max_response_len": 4, "async_buffer_size": 8, "num_epoch": 1,
          "max_staleness": 4, **kw}  # pacing never holds the 4 prompts back: the run ends when they settle
    args = default_args(**kw)
    buf = RolloutBuffer(args)
    return RolloutManager(args, Local(buf), [engine]), buf


def run_to_end(mgr):
    async def go():
        await mgr.start()
        await mgr._task  # num_epoch=1: the producers stop once every prompt's group settled
        await mgr.close()

    anyio.run(go)
    return mgr


def test_reward_exception_marks_samples_failed_and_keeps_the_ledger(tiny_ckpt, prompts, engine):
    mgr, buf = make(tiny_ckpt, prompts, engine, custom_rm_path=P + "fails_on_first_group")
    run_to_end(mgr)
    assert buf.ledger.counts()["failed"] == 1 and buf.ledger.counts()["queued"] == 3 and buf.check_ledger()
    assert mgr.stats["reward_failures"] == 2 and mgr.stats["groups_failed"] == 1
    (group,) = mgr.failed
    assert all(s.status == Status.FAILED and "grader crashed" in s.metadata["reward_error"] for s in group)
    assert "reward" in buf.ledger.reason(group[0].group_id)


def test_reward_timeout_marks_samples_failed(tiny_ckpt, prompts, engine):
    mgr, buf = make(tiny_ckpt, prompts, engine, custom_rm_path=P + "hangs_on_second_group", rm_timeout=0.5)
    run_to_end(mgr)
    assert buf.ledger.counts()["failed"] == 1 and buf.ledger.counts()["queued"] == 3
    assert all("timed out after 0.5s" in s.metadata["reward_error"] for s in mgr.failed[0])


def test_stop_keeps_a_group_whose_reward_hangs_as_partial(tiny_ckpt, prompts, engine):
    # no --rm-timeout: the second group's grader never returns; stop() gives it a grace period, then cancels it
    # and keeps it (generated, unscored) as a partial group to score after a resume, never lost or left in flight
    mgr, buf = make(tiny_ckpt, prompts, engine, custom_rm_path=P + "hangs_on_second_group", rm_timeout=0)

    async def go():
        await mgr.start()
        while mgr.stats["groups_done"] < 3:  # polling a condition
            assert mgr.fatal is None, mgr.fatal
            await anyio.sleep(0.05)
        stats = await mgr.stop(grace_s=0.5)
        tokens = await mgr.token_state()
        await mgr.close()
        return stats, tokens

    stats, tokens = anyio.run(go)
    assert stats["fatal"] is None and stats["in_flight"] == 0
    counts = buf.check_ledger()
    assert (counts["queued"], counts["partial"], counts["in_flight"]) == (3, 1, 0)
    [hung] = mgr.partials
    assert hung[0].group_index == 1 and all(s.response_length > 0 and s.reward is None for s in hung)
    assert buf.ledger.reason(hung[0].group_id) == "cancelled at stop while scoring"
    carried = sum(buf.carried_tokens().values()) + tokens["partial_stopped"]
    assert tokens["generated"] == carried > 0  # the token ledger: all generated tokens still carried


def test_stuck_message_names_the_oldest_group_or_the_pacing_bound():
    from pipelines.health import stuck_message

    st = {"in_flight": 3, "oldest_in_flight": {"group": "e0-p7", "stage": "scoring", "age_s": 912.4},
          "errors": [], "last_progress_age_s": 905.0}
    slots = {"used": 40, "limit": 40, "room": 0}
    msg = stuck_message(st, {"slots": slots, "size": 2}, step=11, watchdog_s=900)
    assert msg == ("no rollout progress for 905 s (--rollout-watchdog-timeout 900) while the trainer waits for step "
                   "12: 3 groups in flight, the oldest (e0-p7) scoring for 912 s")
    st.update(in_flight=0, oldest_in_flight=None, errors=["engine x: refused"])
    assert stuck_message(st, {"slots": slots, "size": 2}, 11, 900).endswith(
        "no group in flight; admission pacing allows no new group (40 slots used of 40, 2 queued); "
        "last errors: ['engine x: refused']")


def test_group_rm_and_dynamic_filter(tiny_ckpt, prompts, engine):
    mgr, buf = make(tiny_ckpt, prompts, engine, custom_rm_path=P + "group_rank", group_rm=True,
                    dynamic_sampling_filter_path="check_reward_nonzero_std")
    run_to_end(mgr)
    assert buf.ledger.counts()["queued"] == 4
    assert all([s.reward for s in g] == [0.0, 1.0] for g in buf.groups)
    mgr, buf = make(tiny_ckpt, prompts, engine, custom_rm_path=P + "constant",
                    dynamic_sampling_filter_path="check_reward_nonzero_std")
    run_to_end(mgr)
    assert buf.ledger.counts()["filtered"] == 4 and buf.ledger.reasons() and buf.check_ledger()
    assert mgr.stats["filter_reasons"] == {"zero_std_1.0": 4} and buf.slots()["used"] == 0  # slots given back
    assert mgr.stats["tokens_generated"] > 0
    assert buf.tokens.to_dict()["discarded"] == {"filtered": mgr.stats["tokens_generated"]}  # the token ledger


def test_data_source_plugin_and_per_sample_generate_function(tiny_ckpt, prompts, engine):
    mgr, buf = make(tiny_ckpt, prompts, engine, data_source_path=P + "TwoGroups", custom_rm_path=P + "constant")
    run_to_end(mgr)
    assert sorted(g[0].group_id for g in buf.groups) == ["ds-0", "ds-1"]
    assert all(s.metadata["generated_by"] == "tagged_generate" and s.tokens[:3] for g in buf.groups for s in g)


def test_rollout_function_keeps_the_ledger_exact(tiny_ckpt, prompts, engine):
    mgr, buf = make(tiny_ckpt, prompts, engine, rollout_function_path="examples/sync_rollout/rollout.py:"
                    "generate_rollout", over_sampling_batch_size=3, custom_rm_path=P + "constant", num_epoch=None,
                    max_staleness=1)

    async def go():
        await mgr.start()
        while mgr.stats["rollouts"] < 2:  # then pacing (version 0, 4 groups) holds the third rollout back
            assert mgr.fatal is None, mgr.fatal
            await anyio.sleep(0.05)  # polling a condition
        await mgr.stop()
        await mgr.close()

    anyio.run(go)
    counts = buf.ledger.counts()
    assert counts["queued"] == 4 and counts["partial"] == 1 and buf.check_ledger()  # the surplus went back
    assert all(s.reward == 1.0 and s.response_length > 0 for g in buf.groups for s in g)


def test_eval_per_dataset_with_weight_version(tiny_ckpt, prompts, engine, tmp_path):
    mgr, _ = make(tiny_ckpt, prompts, engine, eval_prompt_data=["a", prompts, "b", prompts],
                  n_samples_per_eval_prompt=2, eval_max_response_len=3, custom_rm_path=P + "constant")
    mgr.version = 3
    m = anyio.run(mgr.evaluate, 7)
    assert m["eval/a/reward"] == m["eval/b/reward"] == m["eval/reward"] == 1.0 and m["eval/a/n"] == 8
    assert m["eval/version"] == 3.0 and m["eval/version_min"] == m["eval/version_max"] == 0.0  # engine: version 0
    args = default_args(eval_prompt_data=[prompts])
    assert args.eval_datasets == [("p", prompts)] and args.eval_max_response_len == args.rollout_max_response_len


@pytest.mark.parametrize("flag, spec, message", [
    ("custom_rm_path", "no_such_module:rm", "module 'no_such_module' not found"),
    ("dynamic_sampling_filter_path", P + "nope", "has no function 'nope'"),
    ("rollout_function_path", "missing/file.py:fn", "does not exist"),
    ("custom_generate_function_path", "streamrl.rollout.generate:nope", "has no function 'nope'"),
    ("data_source_path", "tests/plugins/rollout_plugins.py:Nope", "has no function 'Nope'"),
    ("rollout_sample_filter_path", "notaspec", "unknown --rollout-sample-filter-path"),
])
def test_wrong_plugin_paths_name_what_failed(tiny_ckpt, prompts, engine, flag, spec, message):
    with pytest.raises(ValueError, match=message) as e:
        make(tiny_ckpt, prompts, engine, **{flag: spec})
    assert "--" + flag.replace("_", "-") in str(e.value)


def test_token_versions_from_weight_version_starts():
    """An in-place pause: the engine says where each version's tokens start; a malformed list is an EngineError."""
    from streamrl.rollout.client import EngineError
    from streamrl.rollout.generate import apply_output, token_versions
    from streamrl.types import Sample

    assert token_versions({"weight_version": "4"}, 3) == 4
    meta = {"weight_version": "5", "weight_version_starts": [[0, "3"], [2, "4"], [3, "5"]]}
    assert token_versions(meta, 5) == [3, 3, 4, 5, 5]
    s = Sample(prompt="p", tokens=[1, 2])
    apply_output(s, {"output_ids": [7, 8, 9, 10, 11], "meta_info": {
        **meta, "finish_reason": {"type": "length"}, "output_token_logprobs": [[-0.1, t, None] for t in range(5)]}})
    assert s.token_versions == [3, 3, 4, 5, 5] and s.weight_versions == ["5"]
    with pytest.raises(EngineError, match="do not cover"):
        token_versions({"weight_version_starts": [[0, "1"], [9, "2"]]}, 5)


def test_long_tail_bench_generate_stops_each_sample_at_its_length(tiny_ckpt, prompts, engine):
    """scripts/bench/long_tail.py (the GPU bench's job): every sample ends COMPLETED at the length its index fixes
    (capped by --rollout-max-response-len), through the producers like any custom generate function."""
    import importlib.util

    path = ROOT / "scripts" / "bench" / "long_tail.py"
    spec = importlib.util.spec_from_file_location("long_tail_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mgr, buf = make(tiny_ckpt, prompts, engine, rollout_max_response_len=40, custom_rm_path=P + "constant",
                    custom_generate_function_path=f"{path}:generate")
    run_to_end(mgr)
    samples = [s for g in buf.groups for s in g]
    assert len(samples) == 8
    eos = mgr.tokenizer.eos_token_id
    for s in samples:  # at its length, or earlier where the tiny model itself emitted EOS
        target = mod.target_length(s.index, 40)
        assert s.response_length == target or (s.response_length < target and s.tokens[-1] == eos), s.index
        assert s.status == Status.COMPLETED
    assert sum(s.response_length == mod.target_length(s.index, 40) for s in samples) >= 4
    assert len({s.response_length for s in samples}) > 1


def test_eval_keys_and_skipped_prompts(tiny_ckpt, prompts, engine, tmp_path):
    """--eval-input-key / --eval-label-key read eval files with their own keys; a prompt over
    --rollout-max-prompt-len is counted in eval/<name>/skipped, not silently dropped."""
    path = tmp_path / "e.jsonl"
    rows = [{"question": "sort:21=", "answer": "abc"}, {"question": "sort:3=", "answer": "de"},
            {"question": "sort:" + "9" * 60 + "=", "answer": "x"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mgr, _ = make(tiny_ckpt, prompts, engine, eval_prompt_data=["e", str(path)], eval_input_key="question",
                  eval_label_key="answer", eval_max_response_len=2, rollout_max_prompt_len=30,
                  custom_rm_path=P + "label_length")
    m = anyio.run(mgr.evaluate, 0)
    assert m["eval/e/n"] == 2 and m["eval/e/skipped"] == 1
    assert m["eval/e/reward"] == 2.5  # labels "abc" and "de": read from "answer"


def test_rollout_stop_strings_reach_the_engine():
    """--rollout-stop: SGLang's `stop` in every request's sampling params (the engine's stop handling is tested in
    test_engine.py); absent by default."""
    from types import SimpleNamespace

    from streamrl.rollout.manager import RolloutManager

    params = RolloutManager.sampling_params(SimpleNamespace(args=default_args(rollout_stop=["</answer>", "\n\n"])), 5)
    assert params["stop"] == ["</answer>", "\n\n"] and params["max_new_tokens"] == 5 and params["no_stop_trim"]
    assert "stop" not in RolloutManager.sampling_params(SimpleNamespace(args=default_args()), 5)
    eval_args = default_args(rollout_top_p=0.9, eval_top_p=0.5)  # --eval-top-p: eval's own nucleus p
    assert RolloutManager.sampling_params(SimpleNamespace(args=eval_args), 5)["top_p"] == 0.9
    assert RolloutManager.sampling_params(SimpleNamespace(args=eval_args), 5, top_p=0.5)["top_p"] == 0.5


def test_pass_at_k_by_hand():
    """--log-passrate's estimator: n = 4 samples per prompt, c = 1, 4, 0 passing. Prompt 1: pass@1 = 1 − 3/4,
    pass@2 = 1 − C(3,2)/C(4,2) = 1/2, pass@4 = 1; prompt 2: all 1; prompt 3: all 0."""
    from streamrl.rollout.evaluation import pass_at_k

    got = pass_at_k([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert got == pytest.approx({"pass@1": 1.25 / 3, "pass@2": 0.5, "pass@4": 2 / 3})
    assert pass_at_k([[0.5, 1.0]]) == {"pass@1": 0.5, "pass@2": 1.0}  # only reward 1 passes
    with pytest.raises(ValueError, match="same number"):
        pass_at_k([[1.0], [1.0, 0.0]])


def test_eval_logs_pass_at_k(tiny_ckpt, prompts, engine):
    mgr, _ = make(tiny_ckpt, prompts, engine, eval_prompt_data=["a", prompts], n_samples_per_eval_prompt=4,
                  eval_max_response_len=2, custom_rm_path=P + "constant", log_passrate=True)
    m = anyio.run(mgr.evaluate, 0)
    assert m["eval/a/pass@1"] == m["eval/a/pass@2"] == m["eval/a/pass@4"] == 1.0 and "eval/a/pass@8" not in m


def test_rollout_max_context_len_caps_new_tokens():
    """--rollout-max-context-len: new tokens <= context − (prompt + response so far); a prompt that fills the
    context ends TRUNCATED with nothing to generate."""
    from types import SimpleNamespace

    from streamrl.rollout.manager import RolloutManager
    from streamrl.types import Sample, Status

    mgr = SimpleNamespace(args=default_args(rollout_max_response_len=64, rollout_max_context_len=10), stats={})
    s = Sample(tokens=[1, 2, 3, 4, 5])
    s.append_response_tokens(tokens=[6, 7, 8], log_probs=[-1.0] * 3, version=0)
    assert RolloutManager._prepare(mgr, s) == 2  # 10 − 8 left, not 64 − 3
    full = Sample(tokens=list(range(12)))
    assert RolloutManager._prepare(mgr, full) == 0 and full.status == Status.TRUNCATED
    mgr.args = default_args(rollout_max_response_len=64)
    assert RolloutManager._prepare(mgr, Sample(tokens=list(range(12)))) == 64  # off by default
