"""Small network helpers shared by the client side (rollout/), the server side (engine/) and the trainer."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1", avoid: set[int] | frozenset[int] = frozenset()) -> int:
    """A port that is free on `host` now (the OS picks; `avoid` skips ports handed out already)."""
    while True:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port
