"""`keras-hps serve` as a subprocess: TF Serving's flags, readiness, and SIGTERM draining."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
from serving_models import VOCAB, free_port, reference, save_version

pytest.importorskip("tensorflow")


def test_sigterm_lets_in_flight_requests_finish(tmp_path):
    base = tmp_path / "m"
    save_version(str(base / "1"), seed=5)
    batching = tmp_path / "batching.config"
    # requests wait up to 1.5 s in the batching queue: they are in flight when SIGTERM lands
    batching.write_text(
        "max_batch_size { value: 1000 }\nbatch_timeout_micros { value: 1500000 }\n"
        "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 100 }\n"
    )
    grpc_port, rest_port = free_port(), free_port()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "keras_hps.cli", "serve", f"--port={grpc_port}",
         f"--rest_api_port={rest_port}", "--host=127.0.0.1", "--model_name=m",
         f"--model_base_path={base}", "--enable_batching",
         f"--batching_parameters_file={batching}", "--file_system_poll_wait_seconds=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "keras-hps serve: ready" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(90), "".join(lines)
        assert any("model m version 1: AVAILABLE" in ln for ln in lines)
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
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert proc.wait(30) == 0, "".join(lines)
        for i in range(6):
            assert not isinstance(results[i], Exception), results[i]
            status, body, ids, x = results[i]
            assert status == 200, body
            np.testing.assert_allclose(body["outputs"]["score"],
                                       reference(5, ids, x)["score"], rtol=1e-5)
        reader.join(5)
        text = "".join(lines)
        assert "stopping (finishing in-flight requests)" in text and "stopped" in text
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{rest_port}/v1/models/m", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
