"""launch.py: the local Ray cluster listens on loopback only, and shutdown is best effort (a dead actor is logged,
never raised over the error that is already propagating)."""

from __future__ import annotations

import logging
import os
import sys
import time

import pytest
from netutil import listening, process_tree

from streamrl.config import default_args

PREEXISTING: set[tuple[int, str, int]] = set()


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from pipelines.launch import init_ray

    assert not ray.is_initialized()
    PREEXISTING.update(listening({os.getpid()}))  # sockets this pytest process had already (earlier tests' servers)
    init_ray(default_args())
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    yield ray
    ray.shutdown()


class _Actor:
    def __init__(self, marker: str | None = None):
        self.marker = marker

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        pass

    def shutdown(self) -> None:
        if self.marker:
            open(self.marker, "w").close()


def test_local_cluster_listens_on_loopback_only(local_ray):
    actor = local_ray.remote(num_cpus=0)(_Actor).remote()
    worker_pid = local_ray.get(actor.pid.remote())
    pids = process_tree(os.getpid())
    assert worker_pid in pids  # the tree covers GCS, raylet, agents and the workers
    socks = [s for s in listening(pids) if s not in PREEXISTING]
    assert len(socks) >= 3  # GCS, raylet and the worker at least
    assert [s for s in socks if s[1] not in ("127.0.0.1", "::1")] == []
    local_ray.kill(actor)


def _dead_within(ray, actor, seconds: float) -> bool:
    """True once a call on `actor` fails with RayActorError (polled: a kill takes effect asynchronously)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get(actor.pid.remote(), timeout=seconds)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.05)  # polling a condition: the kill has not landed yet
    return False


class _Raises:
    def shutdown(self) -> None:
        raise RuntimeError("trainer rank 1 is gone")


class _Router:
    stopped = False

    def stop(self) -> None:
        self.stopped = True


def test_shutdown_with_dead_actors_keeps_the_original_error(local_ray, tmp_path, caplog):
    from pipelines.launch import Components, shutdown

    cls = local_ray.remote(num_cpus=0)(_Actor)
    manager, dead_engine, buffer = cls.remote(), cls.remote(), cls.remote()
    live_engine = cls.remote(str(tmp_path / "engine1-stopped"))
    local_ray.get([a.pid.remote() for a in (manager, dead_engine, buffer, live_engine)])
    for actor in (manager, dead_engine):  # ray.kill returns at once: wait until the actor is really gone
        local_ray.kill(actor)
        assert _dead_within(local_ray, actor, 30.0)
    router = _Router()
    c = Components([dead_engine, live_engine], ["http://127.0.0.1:1", "http://127.0.0.1:2"], buffer, manager,
                   _Raises(), router)
    errors: list[str] = []
    with caplog.at_level(logging.WARNING, logger="pipelines.launch"):
        with pytest.raises(RuntimeError, match="engine http://127.0.0.1:1 died") as exc:
            try:
                raise RuntimeError("engine http://127.0.0.1:1 died")
            finally:
                errors = shutdown(c)
    assert exc.value.__context__ is None  # nothing raised over it
    assert [e.split(":")[0] for e in errors] == ["manager close", "trainer shutdown", "engine 0 shutdown"]
    assert "ActorDiedError" in errors[0] and "trainer rank 1 is gone" in errors[1]
    assert [r.getMessage() for r in caplog.records] == [f"shutdown: {e}" for e in errors]
    # every step after the failures still ran
    assert router.stopped and (tmp_path / "engine1-stopped").exists()
