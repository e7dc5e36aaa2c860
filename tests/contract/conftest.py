"""The engine contract suite runs against every base URL here: the embedded engine on CPU always, a real SGLang server
when `STREAMRL_SGLANG_URL` is set (e.g. http://127.0.0.1:30000, started with `--weight-version 0`)."""

import os

import pytest


@pytest.fixture(scope="session")
def embedded_url(tiny_ckpt):
    from streamrl.engine.actor import EmbeddedEngine

    with EmbeddedEngine(tiny_ckpt, max_running_requests=16) as eng:
        yield eng.url


@pytest.fixture(params=["embedded", "sglang"])
def base_url(request):
    if request.param == "sglang":
        url = os.environ.get("STREAMRL_SGLANG_URL")
        if not url:
            pytest.skip("STREAMRL_SGLANG_URL not set (a running SGLang server)")
        return url.rstrip("/")
    return request.getfixturevalue("embedded_url")
