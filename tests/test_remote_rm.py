"""--rm-type remote_rm / --rm-url (slime's remote reward): the payload, the answer as the reward, retries on 429/5xx
and connection errors only, and the one-line error without --rm-url."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import httpx
import pytest

from streamrl.config import ConfigError, default_args
from streamrl.rollout import rewards
from streamrl.types import Sample


@pytest.fixture
def server():
    """A reward server: answers per a script of statuses (then 200), scoring len(response) / 10."""
    seen: list[dict] = []
    script: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            status = script.pop(0) if script else 200
            out = json.dumps({"score": len(body["response"]) / 10, "label_seen": body["label"]}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/score", seen, script
    httpd.shutdown()


def _sample() -> Sample:
    return Sample(index=3, prompt="2+2=", response="four!", label="4")


def test_the_answer_is_the_reward(server):
    url, seen, _ = server
    args = default_args(rm_type="remote_rm", rm_url=url, reward_key="score")
    fn = rewards.load_reward_fn(args)
    got = anyio.run(fn, args, _sample())
    assert got == {"score": 0.5, "label_seen": "4"}
    assert seen == [{"prompt": "2+2=", "response": "four!", "label": "4"}]
    assert rewards.check_reward(got, "score") is None  # trained on got["score"]


def test_retries_5xx_and_429_but_not_4xx(server, monkeypatch):
    url, seen, script = server
    monkeypatch.setattr(rewards, "REMOTE_RM_BACKOFF_S", 0.01)
    args = default_args(custom_rm_path="remote_rm", rm_url=url)
    script[:] = [503, 429]
    assert anyio.run(rewards.remote_rm, args, _sample())["score"] == 0.5 and len(seen) == 3
    seen.clear()
    script[:] = [400]
    with pytest.raises(httpx.HTTPStatusError, match="400"):
        anyio.run(rewards.remote_rm, args, _sample())
    assert len(seen) == 1


def test_an_unreachable_server_fails_after_the_retries(monkeypatch):
    monkeypatch.setattr(rewards, "REMOTE_RM_BACKOFF_S", 0.001)
    monkeypatch.setattr(rewards, "REMOTE_RM_ATTEMPTS", 3)
    args = default_args(rm_type="remote_rm", rm_url="http://127.0.0.1:9/score")  # discard port: refused
    with pytest.raises(RuntimeError, match="no answer after 3 tries"):
        anyio.run(rewards.remote_rm, args, _sample())


def test_remote_rm_without_a_url_is_a_config_error():
    with pytest.raises(ConfigError, match="--rm-url"):
        default_args(rm_type="remote_rm")
