"""Peak resident memory of `keras-hps serve` while it reads large gRPC requests.

A `keras-hps serve` subprocess serves a small SavedModel (ids int64 [?, 2], x float32 [?, 3]).
Each request carries both inputs as `tensor_content`, with x sent as float64 so that the
server reads and decodes the whole request and then refuses it (INVALID_ARGUMENT): what is
measured is the cost of reading a request, not of running the model. The server's peak
resident set (VmHWM, reset before each request) is compared with its resident set just before
the request and with the request's size, in the same run. With `--limit-mib`, the server's
receive limit (`--grpc_channel_arguments=grpc.max_receive_message_length`) is set, and
requests over it are refused with RESOURCE_EXHAUSTED.

    python benchmarks/bench_grpc_request_memory.py --sizes-mib 64,256 --limit-mib 128
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import threading
from datetime import datetime, timezone

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scratch import scratch_dir  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return {key: int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def request_of(mib: int):
    """A Predict request of about `mib` MiB that the server reads whole, then refuses."""
    from tensorflow_serving.apis import predict_pb2

    from keras_hps.serving.tensors import to_proto

    rows = (mib << 20) // 40  # ids 16 bytes + x (float64) 24 bytes a row
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["ids"].CopyFrom(to_proto(np.zeros((rows, 2), np.int64), True))
    request.inputs["x"].CopyFrom(to_proto(np.zeros((rows, 3), np.float64), True))
    return request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", default="64,256", help="request sizes, comma-separated")
    parser.add_argument("--limit-mib", type=int, default=0,
                        help="the server's receive limit (0: TF Serving's 2 GiB - 1)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import grpc
    from serving_models import free_port, save_version
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    workdir = str(scratch_dir("khps-grpc-mem-"))
    save_version(os.path.join(workdir, "m", "1"), seed=3)
    port = free_port()
    flags = [f"--port={port}", "--host=127.0.0.1", "--model_name=m",
             f"--model_base_path={workdir}/m", "--file_system_poll_wait_seconds=0"]
    if args.limit_mib:
        flags.append(f"--grpc_channel_arguments=grpc.max_receive_message_length="
                     f"{args.limit_mib << 20}")
    proc = subprocess.Popen([sys.executable, "-m", "keras_hps.cli", "serve", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "keras-hps serve: ready" in line:
            break
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    options = [("grpc.max_send_message_length", 2**31 - 1)]
    print(f"- Machine: {platform.node()} ({os.cpu_count()} CPUs), Python "
          f"{platform.python_version()}; date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"- Command: `python benchmarks/bench_grpc_request_memory.py --sizes-mib "
          f"{args.sizes_mib} --limit-mib {args.limit_mib}`\n")
    print("| request MiB | answer | RSS before MiB | peak MiB | growth MiB | growth / request |")
    print("|---|---|---|---|---|---|")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for mib in (int(x) for x in args.sizes_mib.split(",")):
                request = request_of(mib)
                size = request.ByteSize() / 2**20
                with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := VmRSS
                before = memory_mib(proc.pid)["VmRSS"]
                try:
                    stub.Predict(request, timeout=300)
                    answer = "OK"
                except grpc.RpcError as exc:
                    answer = exc.code().name
                peak = memory_mib(proc.pid)["VmHWM"]
                print(f"| {size:,.0f} | {answer} | {before:,.0f} | {peak:,.0f} | "
                      f"{peak - before:,.0f} | {(peak - before) / size:.2f}x |")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
