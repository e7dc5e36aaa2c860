"""A character-level tokenizer built in-repo with HF `tokenizers` (no hub download).

Every printable ASCII character is one token, plus chat/special tokens. It is saved as a normal HF tokenizer
(`tokenizer.json` + config) beside the tiny model, so `AutoTokenizer.from_pretrained(--hf-checkpoint)` loads it.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"]
CHARS = sorted(set(string.digits + string.ascii_lowercase + string.ascii_uppercase + " =+-*:,.?!()[]<>|_/\n"))

# ChatML-like, so --apply-chat-template works; kept short because every character is a token.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'][0] }}:{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>a:{% endif %}"
)


def build_tokenizer(extra_chars: str = ""):
    """Return a `transformers.PreTrainedTokenizerFast` over single characters; `extra_chars` (e.g. every character
    of a user's data) get ids after the built-in ones, so the default vocabulary is unchanged."""

    extra = sorted(set(extra_chars) - set(CHARS))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS + extra)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
