"""`--spin_wait_ms`: a SCHED_IDLE thread on the frontend CPUs spins while requests run and for
the window after the last one, then blocks, so an idle server uses no CPU."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from serving_models import reference, save_version, wait_for

tf = pytest.importorskip("tensorflow")

from keras_hps.errors import ConfigError  # noqa: E402
from keras_hps.servable import load_servable  # noqa: E402
from keras_hps.serving.client import GrpcClient  # noqa: E402
from keras_hps.serving.model_config import ModelEntry  # noqa: E402
from keras_hps.serving.server import ModelServer, ServerOptions  # noqa: E402
from keras_hps.serving.spin_wait import SpinWait  # noqa: E402

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
linux_two_cpus = pytest.mark.skipif(
    len(CPUS) < 2 or not hasattr(os, "SCHED_IDLE"), reason="needs Linux and 2 CPUs"
)


def cpu_ns(native_id: int) -> int:
    """CPU time a thread of this process has run, in ns (/proc schedstat)."""
    with open(f"/proc/self/task/{native_id}/schedstat") as f:
        return int(f.read().split()[0])


def assert_idle(spin: SpinWait, tid: int) -> None:
    """The spinner leaves its loop and then uses no CPU for half a second."""
    assert wait_for(lambda: not spin.spinning), "the spinner did not stop"
    time.sleep(0.05)
    before = cpu_ns(tid)
    time.sleep(0.5)
    assert cpu_ns(tid) - before < 1_000_000, "the spinner used CPU while the server idled"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("spin")
    save_version(str(root / "m" / "1"), seed=4)
    return root


@linux_two_cpus
def test_server_spins_while_busy_and_stops_when_idle(repo):
    gate = threading.Event()
    entered = threading.Event()

    def loader(path: str):
        servable = load_servable(path)
        run = servable.run

        def gated_run(inputs, *args, **kwargs):
            if inputs["ids"].shape[0] == 7:  # the one request the test holds in flight
                entered.set()
                assert gate.wait(30)
            return run(inputs, *args, **kwargs)

        servable.run = gated_run
        return servable

    options = ServerOptions(port=0, rest_api_port=0, host="127.0.0.1",
                            file_system_poll_wait_seconds=0, spin_wait_ms=2)  # auto CPUs
    server = ModelServer([ModelEntry("m", str(repo / "m"))], options, loader=loader).start()
    client = GrpcClient(f"127.0.0.1:{server.grpc_port}")
    try:
        spin = server._spin
        assert server.frontend_cpus == (CPUS[0],) and spin.running
        tid = spin._thread.native_id
        assert os.sched_getscheduler(tid) == os.SCHED_IDLE
        assert os.sched_getaffinity(tid) == {CPUS[0]}
        assert_idle(spin, tid)  # started, no request yet: blocked

        rng = np.random.default_rng(1)
        ids = rng.integers(0, 50, size=(7, 2)).astype(np.int64)
        x = rng.normal(size=(7, 3)).astype(np.float32)
        answers: list = []
        caller = threading.Thread(
            target=lambda: answers.append(client.predict("m", {"ids": ids, "x": x}))
        )
        caller.start()
        assert entered.wait(30)
        # in flight: the spinner runs, however long the model call takes
        assert wait_for(lambda: spin.spinning), "no spinning while a request ran"
        before = cpu_ns(tid)
        assert wait_for(lambda: cpu_ns(tid) > before), "the spinner got no CPU"
        time.sleep(0.1)
        assert spin.spinning  # still in flight, far past the 2 ms window
        gate.set()
        caller.join(30)
        np.testing.assert_allclose(answers[0]["score"], reference(4, ids, x)["score"], rtol=1e-5)
        assert_idle(spin, tid)

        for n in (0, 1, 5, 33):  # back-to-back requests, answers stay right
            ids = rng.integers(0, 50, size=(n, 2)).astype(np.int64)
            x = rng.normal(size=(n, 3)).astype(np.float32)
            out = client.predict("m", {"ids": ids, "x": x})
            np.testing.assert_allclose(out["score"], reference(4, ids, x)["score"], rtol=1e-5)
        assert_idle(spin, tid)
    finally:
        gate.set()
        client.close()
        server.stop(grace=5)
    assert not spin.running


def test_spin_off_by_default_with_zero_window_or_without_frontend_cpus(repo):
    assert ServerOptions().spin_wait_ms == 0
    for frontend, ms in ((None, 2.0), ("auto", 0.0)):
        options = ServerOptions(port=0, rest_api_port=0, host="127.0.0.1",
                                file_system_poll_wait_seconds=0, frontend_cpus=frontend,
                                spin_wait_ms=ms)
        server = ModelServer([ModelEntry("m", str(repo / "m"))], options).start()
        try:
            client = GrpcClient(f"127.0.0.1:{server.grpc_port}")
            ids = np.array([[1, 2]], dtype=np.int64)
            x = np.ones((1, 3), np.float32)
            out = client.predict("m", {"ids": ids, "x": x})
            np.testing.assert_allclose(out["score"], reference(4, ids, x)["score"], rtol=1e-5)
            client.close()
            assert not server._spin.running
            assert not [t for t in threading.enumerate() if t.name == "keras-hps-spin"]
        finally:
            server.stop(grace=5)


def test_negative_spin_window_is_an_error():
    options = ServerOptions(port=0, rest_api_port=0, spin_wait_ms=-1)
    server = ModelServer([], options)
    with pytest.raises(ConfigError, match="--spin_wait_ms must be >= 0, got -1"):
        server.start()


@linux_two_cpus
def test_window_after_the_last_of_overlapping_requests():
    spin = SpinWait([CPUS[-1]], window_s=0.2).start()
    try:
        tid = spin._thread.native_id
        spin.begin()
        spin.begin()
        assert wait_for(lambda: spin.spinning)
        spin.end()  # one still runs: keep spinning past the window
        time.sleep(0.4)
        assert spin.spinning
        spin.end()
        t_end = time.monotonic()
        assert wait_for(lambda: not spin.spinning)
        assert time.monotonic() - t_end >= 0.19  # the window after the last end
        assert_idle(spin, tid)
    finally:
        spin.close()
    assert not spin.running
