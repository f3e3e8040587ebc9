"""`--frontend_cpus`: the server's request threads keep to the given CPUs, except while they
run the model beside other requests in flight; the rest of the process does not; bad values
are clear errors."""

from __future__ import annotations

import argparse
import os
import threading

import numpy as np
import pytest
from serving_models import free_port, reference, save_version

tf = pytest.importorskip("tensorflow")

from keras_hps.errors import ConfigError  # noqa: E402
from keras_hps.servable import load_servable  # noqa: E402
from keras_hps.serving import cli  # noqa: E402
from keras_hps.serving.client import GrpcClient, RestClient  # noqa: E402
from keras_hps.serving.model_config import ModelEntry  # noqa: E402
from keras_hps.serving.server import (  # noqa: E402
    ModelServer,
    ServerOptions,
    resolve_frontend_cpus,
)

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
needs_two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="needs Linux and 2 CPUs")


def affinity(native_id: int) -> set[int]:
    return os.sched_getaffinity(native_id)


@needs_two_cpus
def test_request_threads_keep_to_the_frontend_cpus(tmp_path):
    save_version(str(tmp_path / "m" / "1"), seed=3)
    frontend = (CPUS[-1],)
    options = ServerOptions(port=0, rest_api_port=free_port(), host="127.0.0.1",
                            file_system_poll_wait_seconds=0, frontend_cpus=frontend)
    during_run: list[tuple[int, set[int]]] = []  # (batch, the calling thread's CPUs)
    gate, entered = threading.Event(), threading.Event()

    def loader(path: str):
        servable = load_servable(path)
        run = servable.run

        def recording_run(inputs, *args, **kwargs):
            during_run.append((len(inputs["ids"]), os.sched_getaffinity(0)))
            if len(inputs["ids"]) == 7:  # held in flight while another request runs
                entered.set()
                assert gate.wait(30)
            return run(inputs, *args, **kwargs)

        servable.run = recording_run
        return servable

    older = {t.ident for t in threading.enumerate()}  # e.g. other tests' servers' threads
    server = ModelServer([ModelEntry("m", str(tmp_path / "m"))], options, loader=loader).start()
    try:
        assert affinity(threading.get_native_id()) == set(CPUS)  # the caller is restored
        client = GrpcClient(f"127.0.0.1:{server.grpc_port}")
        rng = np.random.default_rng(0)
        for n in (1, 4, 9):  # answers stay right
            ids = rng.integers(0, 50, size=(n, 2)).astype(np.int64)
            x = rng.normal(size=(n, 3)).astype(np.float32)
            out = client.predict("m", {"ids": ids, "x": x})
            np.testing.assert_allclose(out["score"], reference(3, ids, x)["score"], rtol=1e-5)
        # one request at a time: the model call stays on the frontend CPUs
        assert during_run == [(n, set(frontend)) for n in (1, 4, 9)]
        held = threading.Thread(target=client.predict, args=("m", {
            "ids": np.zeros((7, 2), np.int64), "x": np.zeros((7, 3), np.float32)}))
        held.start()
        assert entered.wait(30)
        ids = rng.integers(0, 50, size=(5, 2)).astype(np.int64)
        x = rng.normal(size=(5, 3)).astype(np.float32)
        out = client.predict("m", {"ids": ids, "x": x})
        np.testing.assert_allclose(out["score"], reference(3, ids, x)["score"], rtol=1e-5)
        gate.set()
        held.join(30)
        client.close()
        # beside another request in flight, the call gets every CPU
        assert during_run[3:] == [(7, set(frontend)), (5, set(CPUS))]
        # a lone REST request is one request too (its answer write is not counted as another)
        rest = RestClient(f"http://127.0.0.1:{server.rest_port}")
        ids = rng.integers(0, 50, size=(3, 2)).astype(np.int64)
        x = rng.normal(size=(3, 3)).astype(np.float32)
        out = rest.predict("m", {"ids": ids, "x": x})
        np.testing.assert_allclose(out["score"], reference(3, ids, x)["score"], rtol=1e-5)
        assert during_run[5:] == [(3, set(frontend))]
        handlers = [t for t in threading.enumerate()
                    if t.name.startswith("keras-hps-grpc") and t.ident not in older]
        assert handlers, "no gRPC handler thread was started"
        for t in handlers:
            assert affinity(t.native_id) == set(frontend), t.name
        others = [t for t in threading.enumerate() if t.name == "keras-hps-poll"
                  or t is threading.main_thread()]
        for t in others:
            assert affinity(t.native_id) == set(CPUS), t.name
    finally:
        gate.set()
        server.stop(grace=5)


@needs_two_cpus
def test_frontend_cpus_outside_the_allowed_set_is_an_error(tmp_path):
    options = ServerOptions(port=0, rest_api_port=0, host="127.0.0.1",
                            file_system_poll_wait_seconds=0, frontend_cpus=(max(CPUS) + 64,))
    server = ModelServer([ModelEntry("m", str(tmp_path / "none"))], options)
    with pytest.raises(ConfigError, match=r"--frontend_cpus=\d+: this process may run only"):
        server.start()
    server.stop(grace=1)


def test_serve_flags_parse():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--frontend_cpus=1,0,1", "--enable_model_warmup=false",
                              "--num_request_iterations_for_warmup=3",
                              "--tensorflow_intra_op_parallelism=2",
                              "--tensorflow_inter_op_parallelism=1"])
    assert args.frontend_cpus == (0, 1)
    assert args.enable_model_warmup is False and args.num_request_iterations_for_warmup == 3
    assert (args.tensorflow_intra_op_parallelism, args.tensorflow_inter_op_parallelism) == (2, 1)
    defaults = parser.parse_args([])
    assert defaults.frontend_cpus == "auto" and defaults.enable_model_warmup is True
    assert defaults.spin_wait_ms == 0.0
    assert parser.parse_args(["--frontend_cpus=all"]).frontend_cpus is None
    assert parser.parse_args(["--frontend_cpus", "AUTO", "--spin_wait_ms=0"]).spin_wait_ms == 0
    for bad in ("x", "-1", "", "any"):
        with pytest.raises(SystemExit):
            parser.parse_args([f"--frontend_cpus={bad}"])


def test_auto_frontend_is_one_cpu_of_the_allowed_set():
    cpus = resolve_frontend_cpus("auto")
    if len(CPUS) >= 2:
        assert cpus == (CPUS[0],)
    else:
        assert cpus is None
    assert resolve_frontend_cpus(None) is None
    both = (CPUS[-1], CPUS[0], CPUS[-1])
    assert resolve_frontend_cpus(both) == tuple(sorted(set(both)))
    with pytest.raises(ConfigError, match="--frontend_cpus=sometimes"):
        resolve_frontend_cpus("sometimes")
