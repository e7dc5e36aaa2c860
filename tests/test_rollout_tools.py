"""Multi-turn tool use (examples/calculator_tool): tool output is masked, an aborted turn resumes coherently.

A scripted stand-in engine answers /generate in SGLang's format, so the model's turns are fixed and the test is
deterministic; it records every request so the resume can be checked (prompt + prefix sent back as input_ids).
"""

import anyio
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from examples.calculator_tool.generate import calculate, generate, reward
from streamrl.config import default_args
from streamrl.engine.server import HttpServer
from streamrl.rollout.generate import set_endpoints
from streamrl.types import Sample, Status


class ScriptedEngine:
    def __init__(self, tok, turns):
        self.tok, self.turns, self.requests = tok, list(turns), []
        app = Starlette(routes=[Route("/generate", self.generate, methods=["POST"])])
        self.http = HttpServer(app)

    async def generate(self, request):
        body = msgspec.json.decode(await request.body())
        self.requests.append(body)
        text, finish, version = self.turns.pop(0)
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        ids += [self.tok.eos_token_id] if finish == "eos" else []
        reason = {"type": "stop" if finish in ("eos", "calc") else finish}
        out = {"text": text, "output_ids": ids, "meta_info": {
            "id": "r", "prompt_tokens": len(body["input_ids"]), "completion_tokens": len(ids), "finish_reason": reason,
            "weight_version": version, "output_token_logprobs": [[-0.5, t, None] for t in ids]}}
        return Response(msgspec.json.encode(out), media_type="application/json")


def test_calculator():
    assert calculate("2+3*4") == "14" and calculate("7/2") == "3.5" and calculate("__import__('os')").startswith(
        "error")


def test_tool_tokens_are_masked_and_an_aborted_turn_resumes(tiny_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    n = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    eng = ScriptedEngine(tok, [("<calc>2+", "abort", "0"),  # cut by a weight sync mid-call
                               ("3</calc>", "calc", "1"),  # resumed: the call completes across the two requests
                               ("5", "eos", "1")])  # after the tool output, the answer
    eng.http.start()
    try:
        set_endpoints([eng.http.url], None)
        args = default_args(hf_checkpoint=tiny_ckpt)
        prompt = tok("2+3=", add_special_tokens=False)["input_ids"]
        s = Sample(tokens=list(prompt), label="5")

        async def run():
            await generate(args, s, {"max_new_tokens": 40})
            assert s.status == Status.ABORTED and s.response_length == n("<calc>2+")
            await generate(args, s, {"max_new_tokens": 40 - s.response_length})  # what the producers do on resume

        anyio.run(run)
    finally:
        eng.http.stop()
        set_endpoints([], None)
    assert eng.requests[1]["input_ids"] == prompt + tok("<calc>2+", add_special_tokens=False)["input_ids"]
    tool = n("<result>5</result>")
    assert s.loss_mask == [1] * n("<calc>2+3</calc>") + [0] * tool + [1] * (n("5") + 1)
    start = n("<calc>2+3</calc>")
    assert s.rollout_log_probs[start:start + tool] == [0.0] * tool
    assert s.token_versions[:n("<calc>2+")] == [0] * n("<calc>2+") and s.token_versions[-1] == 1
    assert s.metadata["tool_calls"] == [{"expr": "2+3", "result": "5"}] and s.status == Status.COMPLETED
    assert eng.requests[2]["sampling_params"]["max_new_tokens"] == 40 - n("<calc>2+3</calc>") - tool
    assert "</calc>" in eng.requests[1]["sampling_params"]["stop"]
    s.response = tok.decode(s.tokens[len(prompt):], skip_special_tokens=True)
    assert anyio.run(reward, args, s) == 1.0


@pytest.mark.parametrize("budget", [3])
def test_tool_use_respects_the_token_budget(tiny_ckpt, budget):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    eng = ScriptedEngine(tok, [("<ca", "length", "0")])
    eng.http.start()
    try:
        set_endpoints([eng.http.url], None)
        s = Sample(tokens=[5, 6])
        anyio.run(generate, default_args(hf_checkpoint=tiny_ckpt), s, {"max_new_tokens": budget})
    finally:
        eng.http.stop()
        set_endpoints([], None)
    assert s.status == Status.TRUNCATED and s.response_length == 3 and s.loss_mask == [1, 1, 1]
