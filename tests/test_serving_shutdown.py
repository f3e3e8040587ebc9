"""`keras-hps serve` as a subprocess: SIGTERM drains (REST and gRPC requests already
received are answered, later ones refused, exit 0 within the bound)."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import numpy as np
import pytest
import requests
from serving_models import VOCAB, ServeProcess, free_port, reference, save_version

pytest.importorskip("tensorflow")

from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from keras_hps.serving.tensors import from_proto, to_proto  # noqa: E402

GRACE_S = 20.0


def batching_file(tmp_path, timeout_s: float) -> str:
    """Batching parameters whose batches wait `timeout_s` for more requests (one thread)."""
    path = tmp_path / "batching.config"
    path.write_text(
        "max_batch_size { value: 1000 }\n"
        f"batch_timeout_micros {{ value: {int(timeout_s * 1e6)} }}\n"
        "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 100 }\n"
    )
    return str(path)


def serve_flags(tmp_path, timeout_s: float, *extra: str) -> tuple[list[str], int, int]:
    base = tmp_path / "m"
    save_version(str(base / "1"), seed=5)
    grpc_port, rest_port = free_port(), free_port()
    flags = [f"--port={grpc_port}", f"--rest_api_port={rest_port}", "--host=127.0.0.1",
             "--model_name=m", f"--model_base_path={base}", "--enable_batching",
             f"--batching_parameters_file={batching_file(tmp_path, timeout_s)}",
             "--file_system_poll_wait_seconds=0", f"--shutdown_grace_seconds={GRACE_S}",
             *extra]
    return flags, grpc_port, rest_port


def test_sigterm_lets_in_flight_requests_finish(tmp_path):
    flags, _, rest_port = serve_flags(tmp_path, 1.5)
    with ServeProcess(*flags) as serve:
        assert "model m version 1: AVAILABLE" in serve.output
        url = f"http://127.0.0.1:{rest_port}/v1/models/m:predict"
        rng = np.random.default_rng(0)
        results: dict[int, object] = {}

        def call(i: int) -> None:
            ids = rng.integers(0, VOCAB, size=(2, 2), dtype=np.int64)
            x = np.full((2, 3), float(i), np.float32)
            try:
                r = requests.post(url, json={"inputs": {"ids": ids.tolist(), "x": x.tolist()}},
                                  timeout=30)
                results[i] = (r.status_code, r.json(), ids, x)
            except Exception as exc:  # recorded, asserted below
                results[i] = exc

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # all six are waiting in the batch queue now
        serve.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert serve.proc.wait(30) == 0, serve.output
        for i in range(6):
            assert not isinstance(results[i], Exception), results[i]
            status, body, ids, x = results[i]
            assert status == 200, body
            np.testing.assert_allclose(body["outputs"]["score"],
                                       reference(5, ids, x)["score"], rtol=1e-5)
        text = serve.finish()
        assert "stopping (finishing in-flight requests)" in text and "stopped" in text
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{rest_port}/v1/models/m", timeout=5)


def test_sigterm_answers_grpc_calls_waiting_for_a_handler_thread(tmp_path):
    """12 gRPC predicts are received before SIGTERM, with 2 handler threads: 2 wait in the
    batch queue, 10 for a thread. All 12 are answered exactly; a call made after SIGTERM is
    refused (UNAVAILABLE); the process exits 0 within the drain bound."""
    flags, grpc_port, _ = serve_flags(tmp_path, 0.4, "--grpc_max_threads=2")
    with ServeProcess(*flags) as serve:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        rng = np.random.default_rng(1)
        calls = []
        for _ in range(12):
            ids = rng.integers(0, VOCAB, size=(2, 2), dtype=np.int64)
            x = rng.normal(size=(2, 3)).astype(np.float32)
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "m"
            request.inputs["ids"].CopyFrom(to_proto(ids))
            request.inputs["x"].CopyFrom(to_proto(x))
            calls.append((stub.Predict.future(request, timeout=60), ids, x))
        time.sleep(0.3)  # received: two in the batch queue, ten waiting for a thread
        signalled = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # the server has begun draining
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as late:
            with pytest.raises(grpc.RpcError) as err:
                prediction_service_pb2_grpc.PredictionServiceStub(late).Predict(request,
                                                                                timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        for future, ids, x in calls:
            response = future.result()
            np.testing.assert_allclose(from_proto(response.outputs["score"]),
                                       reference(5, ids, x)["score"], rtol=1e-5)
        assert serve.proc.wait(GRACE_S + 15) == 0, serve.output
        # the bound docs/deployment.md states: the grace period, the poll of the signal, and
        # the unload
        assert time.monotonic() - signalled < GRACE_S + 10
        channel.close()
