"""A multi-turn, tool-using custom generate function: the model calls a calculator, sees its result, continues.

    --custom-generate-function-path examples/calculator_tool/generate.py:generate
    --custom-rm-path examples/calculator_tool/generate.py:reward

Protocol (plain text, so any tokenizer works): the model writes `<calc>2+3*4</calc>`; generation stops at
`</calc>` (an SGLang stop string), the function evaluates the expression safely and appends `<result>14</result>`
as environment tokens (`trainable=False`: loss_mask 0, log-prob 0), then generation continues, until the model
stops without a call, the token budget (`max_new_tokens`) is spent, or `--calculator-max-turns` (default 4) calls
were made.

Partial rollouts and resume: an aborted turn (weight sync) returns the sample ABORTED with its prefix; the next call
resumes from `sample.tokens` and reads the current turn from `metadata["turn_start"]`, so a `<calc>` split by the
abort is still recognised. Tool output is only ever appended right after a complete call, never mid-turn.
"""

from __future__ import annotations

import ast
import functools
import operator
from typing import Any

from streamrl.rollout.generate import apply_output, post_generate
from streamrl.types import Sample, Status

CALL_OPEN, CALL_CLOSE = "<calc>", "</calc>"
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expr: str) -> str:
    """Evaluate + - * / // % and parentheses over numbers; any other input gives an `error: ...` string."""

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError("unsupported expression")

    try:
        value = ev(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as e:
        return f"error: {type(e).__name__}"
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


@functools.cache
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def pending_call(turn_text: str) -> str | None:
    """The expression of a complete call ending the current turn, else None."""
    if not turn_text.rstrip().endswith(CALL_CLOSE) or CALL_OPEN not in turn_text:
        return None
    return turn_text[turn_text.rindex(CALL_OPEN) + len(CALL_OPEN):turn_text.rstrip().rindex(CALL_CLOSE)]


async def generate(args: Any, sample: Sample, sampling_params: dict[str, Any]) -> Sample:
    tok = _tokenizer(args.hf_checkpoint)
    budget = int(sampling_params.get("max_new_tokens") or 0)
    max_turns = int(getattr(args, "calculator_max_turns", 4))
    meta = sample.metadata
    meta.setdefault("turn_start", sample.response_length)
    meta.setdefault("tool_calls", [])
    stops = sampling_params.get("stop") or []
    params = {**sampling_params, "stop": [*([stops] if isinstance(stops, str) else stops), CALL_CLOSE]}
    start_len = sample.response_length
    while True:
        left = budget - (sample.response_length - start_len)
        if left <= 0:
            sample.status = Status.TRUNCATED
            return sample
        out = await post_generate(args, {"input_ids": list(sample.tokens), "return_logprob": True,
                                         "sampling_params": {**params, "max_new_tokens": left}})
        apply_output(sample, out)
        if sample.status == Status.ABORTED:  # resumed later from sample.tokens; turn_start still marks the turn
            return sample
        turn = tok.decode(sample.tokens[sample.prompt_length + meta["turn_start"]:], skip_special_tokens=True)
        expr = pending_call(turn)
        if expr is None or len(meta["tool_calls"]) >= max_turns:
            return sample  # COMPLETED (no call) or TRUNCATED (budget) as the engine said
        result = calculate(expr)
        meta["tool_calls"].append({"expr": expr, "result": result})
        tool_ids = list(tok(f"<result>{result}</result>", add_special_tokens=False)["input_ids"])
        tool_ids = tool_ids[:max(0, budget - (sample.response_length - start_len))]
        version = sample.token_versions[-1] if sample.token_versions else 0
        sample.append_response_tokens(tokens=tool_ids, log_probs=None, trainable=False, version=version)
        meta["turn_start"] = sample.response_length  # the model's next turn starts after the tool output
        sample.status = Status.PENDING


async def reward(args: Any, sample: Sample) -> float:
    """1.0 when the text after the last tool result equals the label."""
    answer = sample.response.rsplit("</result>", 1)[-1]
    return float(sample.label is not None and answer.strip() == str(sample.label).strip())
