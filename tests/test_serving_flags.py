"""`keras-hps serve` takes tensorflow_model_server's command line: every flag of TF Serving's
main.cc with its name, type and default, TF Serving's boolean syntax, its start-up errors,
and the flags that change behaviour (Unix socket, channel arguments, health service,
config polling, load retries and threads, labels)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from serving_models import save_version, wait_for

tf = pytest.importorskip("tensorflow")

from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from keras_hps.cli import normalize_flags  # noqa: E402
from keras_hps.serving import cli  # noqa: E402
from keras_hps.serving.manager import ModelManager, State  # noqa: E402
from keras_hps.serving.model_config import ModelEntry, load_model_config_file  # noqa: E402
from keras_hps.serving.server import ModelServer, ServerOptions  # noqa: E402
from keras_hps.serving.status import ServingError  # noqa: E402

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

# The flag table of tensorflow_serving/model_servers/main.cc (TF Serving 2.x: the list passed
# to tensorflow::Flags::Parse, in its order), with each flag's C++ type and its default from
# Server::Options in tensorflow_serving/model_servers/server.h (and server.cc's Options()
# constructor for model_name and saved_model_tags). Copied here as data, to check our table.
MAIN_CC_FLAGS = [
    ("port", "int32", 8500),
    ("grpc_socket_path", "string", ""),
    ("rest_api_port", "int32", 0),
    ("rest_api_num_threads", "int32", 4 * CPUS),
    ("rest_api_timeout_in_ms", "int32", 30000),
    ("rest_api_enable_cors_support", "bool", False),
    ("enable_batching", "bool", False),
    ("allow_version_labels_for_unavailable_models", "bool", False),
    ("batching_parameters_file", "string", ""),
    ("enable_per_model_batching_parameters", "bool", False),
    ("model_config_file", "string", ""),
    ("model_config_file_poll_wait_seconds", "int32", 0),
    ("model_name", "string", "default"),
    ("model_base_path", "string", ""),
    ("num_load_threads", "int32", 0),
    ("num_unload_threads", "int32", 0),
    ("max_num_load_retries", "int32", 5),
    ("load_retry_interval_micros", "int64", 60 * 1000 * 1000),
    ("file_system_poll_wait_seconds", "int32", 1),
    ("flush_filesystem_caches", "bool", True),
    ("tensorflow_session_parallelism", "int64", 0),
    ("tensorflow_session_config_file", "string", ""),
    ("tensorflow_intra_op_parallelism", "int64", 0),
    ("tensorflow_inter_op_parallelism", "int64", 0),
    ("use_alts_credentials", "bool", False),
    ("ssl_config_file", "string", ""),
    ("platform_config_file", "string", ""),
    ("per_process_gpu_memory_fraction", "float", 0.0),
    ("saved_model_tags", "string", "serve"),
    ("grpc_channel_arguments", "string", ""),
    ("grpc_max_threads", "int32", 4 * CPUS),
    ("enable_model_warmup", "bool", True),
    ("num_request_iterations_for_warmup", "int32", 0),
    ("version", "bool", False),
    ("monitoring_config_file", "string", ""),
    ("remove_unused_fields_from_bundle_metagraph", "bool", True),
    ("prefer_tflite_model", "bool", False),
    ("num_tflite_pools", "int32", CPUS),
    ("num_tflite_interpreters_per_pool", "int32", 1),
    ("enable_signature_method_name_check", "bool", False),
    ("xla_cpu_compilation_enabled", "bool", False),
    ("xla_gpu_compilation_enabled", "bool", False),
    ("enable_profiler", "bool", True),
    ("thread_pool_factory_config_file", "string", ""),
    ("mixed_precision", "string", ""),
    ("skip_initialize_tpu", "bool", False),
    ("enable_grpc_healthcheck_service", "bool", False),
    ("enable_serialization_as_tensor_content", "bool", False),
]

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p


def test_every_main_cc_flag_with_its_type_and_default():
    ours = {f.name: f for f in cli.FLAGS}
    assert [f.name for f in cli.FLAGS] == [name for name, _, _ in MAIN_CC_FLAGS]
    defaults = parser().parse_args([])
    for name, kind, default in MAIN_CC_FLAGS:
        flag = ours[name]
        assert flag.type == kind or (name == "file_system_poll_wait_seconds"
                                     and flag.type == "float"), name
        assert flag.default == default, name
        if not flag.ignored:  # ignored flags parse to None unless given (to warn then)
            assert getattr(defaults, name) == default, name


@pytest.mark.parametrize("name, kind, default", MAIN_CC_FLAGS, ids=[f[0] for f in MAIN_CC_FLAGS])
def test_every_main_cc_flag_parses(name, kind, default):
    p = parser()
    if kind == "bool":
        assert getattr(p.parse_args([f"--{name}"]), name) is True
        for text, want in (("true", True), ("false", False), ("1", True), ("0", False)):
            assert getattr(p.parse_args([f"--{name}={text}"]), name) is want
        with pytest.raises(SystemExit):
            p.parse_args([f"--{name}=maybe"])
        return
    value = {"int32": "7", "int64": "123456789012", "float": "0.5", "string": "a,b"}[kind]
    got = getattr(p.parse_args([f"--{name}={value}"]), name)
    assert got == (value if kind == "string" else float(value))
    assert getattr(p.parse_args([f"--{name}", value]), name) == got  # the space form too
    hyphens = "--" + name.replace("_", "-")  # mapped by the keras-hps entry point
    assert getattr(p.parse_args(normalize_flags(p, [f"{hyphens}={value}"])), name) == got
    if kind != "string":
        with pytest.raises(SystemExit):
            p.parse_args([f"--{name}=x"])


def test_meaningless_flags_warn_once_each(caplog):
    args = parser().parse_args(["--prefer_tflite_model", "--mixed_precision=bfloat16",
                                "--flush_filesystem_caches=false", "--port=9"])
    with caplog.at_level(logging.WARNING, logger="keras_hps.serving"):
        cli._warn_ignored(args)
    warned = sorted(r.getMessage().split()[0] for r in caplog.records)
    assert warned == ["--flush_filesystem_caches", "--mixed_precision", "--prefer_tflite_model"]
    assert all(len(r.getMessage().splitlines()) == 1 for r in caplog.records)


def test_version_prints_two_lines(capsys):
    from keras_hps.cli import main

    assert main(["serve", "--version"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("TensorFlow ModelServer: keras-hps-")
    assert lines[1] == f"TensorFlow Library: {tf.__version__}"


def _serve(*flags: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "keras_hps.cli", "serve", *flags], capture_output=True,
        text=True, timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def test_bad_models_config_exits_with_tf_servings_error(tmp_path):
    bad = tmp_path / "models.config"
    bad.write_text("model_config_list { config { name: 'a' bogus: 1 } }\n")
    done = _serve(f"--model_config_file={bad}")
    assert done.returncode == 255
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == ("Failed to start server. Error: INVALID_ARGUMENT: Invalid protobuf "
                         f"file: '{bad}'")
    assert any("bogus" in line for line in lines[:-1])  # the parser's detail, logged first


@pytest.mark.parametrize("text, flags, status", [
    ("model_config_list { config { name: 'a' base_path: '/x' } "
     "config { name: 'a' base_path: '/y' } }", [],
     "INVALID_ARGUMENT: Illegal to list model a multiple times in config list"),
    (None, [], "NOT_FOUND: {path}; No such file or directory"),
    ("model_config_list { config { name: 'a' base_path: '/x' } }",
     ["--batching_parameters_file=/b.config"],
     "INVALID_ARGUMENT: server_options.batching_parameters_file is set without setting "
     "server_options.enable_batching to true."),
    ("model_config_list { config { name: 'a' base_path: '/x' } }",
     ["--tensorflow_session_parallelism=2", "--tensorflow_intra_op_parallelism=1",
      "--tensorflow_inter_op_parallelism=1"],
     "INVALID_ARGUMENT: Either configure server_options.tensorflow_session_parallelism or "
     "(server_options.tensorflow_intra_op_parallelism, "
     "server_options.tensorflow_inter_op_parallelism) separately. You cannot configure all."),
], ids=["duplicate", "missing", "batching-file-alone", "parallelism"])
def test_start_errors(tmp_path, capsys, text, flags, status):
    from keras_hps.cli import main

    path = tmp_path / "models.config"
    if text is not None:
        path.write_text(text)
    assert main(["serve", f"--model_config_file={path}", "--port=0", *flags]) == 255
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "Failed to start server. Error: " + status.format(path=path)


def test_no_model_is_tf_servings_error(capsys):
    from keras_hps.cli import main

    assert main(["serve"]) == 255
    assert capsys.readouterr().err.strip() == (
        "Failed to start server. Error: INVALID_ARGUMENT: Both server_options.model_base_path "
        "and server_options.model_config_file are empty!")


def test_unix_socket_channel_arguments_and_health_over_the_command_line(tmp_path):
    """--port=0 --grpc_socket_path: gRPC on the socket only; a receive limit from
    --grpc_channel_arguments refuses a larger request; the health service answers."""
    base = tmp_path / "m"
    save_version(str(base / "1"), seed=9)
    sock = tmp_path / "grpc.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "keras_hps.cli", "serve", "--port=0",
         f"--grpc_socket_path={sock}", "--model_name=m", f"--model_base_path={base}",
         "--grpc_channel_arguments=grpc.max_receive_message_length=4096",
         "--enable_grpc_healthcheck_service", "--file_system_poll_wait_seconds=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if cli.READY_LINE in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    channel = None
    try:
        assert ready.wait(120), "".join(lines)
        assert any(f"UNIX socket {sock}" in ln for ln in lines)
        assert not any("Running gRPC ModelServer at 0.0.0.0" in ln for ln in lines)
        assert not any("HTTP/REST" in ln for ln in lines)  # REST is off by default
        channel = grpc.insecure_channel(f"unix:{sock}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "m"
        request.inputs["ids"].CopyFrom(tf.make_tensor_proto(np.array([[1, 2]], np.int64)))
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 3), np.float32)))
        assert stub.Predict(request, timeout=30).model_spec.version.value == 1
        big = np.zeros((400, 3), np.float32)  # 4800 bytes of tensor content
        request.inputs["ids"].CopyFrom(tf.make_tensor_proto(np.ones((400, 2), np.int64)))
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(big))
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        from keras_hps.serving.protos import health_check_classes

        req_class, resp_class = health_check_classes()
        check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=req_class.SerializeToString,
                                    response_deserializer=resp_class.FromString)
        assert check(req_class(service=""), timeout=10).status == 1  # SERVING
        assert check(req_class(service="tensorflow.serving.PredictionService"),
                     timeout=10).status == 1
        with pytest.raises(grpc.RpcError) as info:
            check(req_class(service="nope"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        if channel is not None:
            channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines)


def test_model_config_file_is_polled(tmp_path, caplog):
    """--model_config_file_poll_wait_seconds: an added model is served, a removed one
    unloaded; a file that does not parse is logged and the config in use kept."""
    for name, seed in (("a", 1), ("b", 2)):
        save_version(str(tmp_path / name / "1"), seed)
    config = tmp_path / "models.config"

    def write(names: list[str]) -> None:
        text = "model_config_list {" + "".join(
            f" config {{ name: '{n}' base_path: '{tmp_path / n}' }}" for n in names) + " }"
        tmp = tmp_path / "models.config.tmp"
        tmp.write_text(text)
        os.replace(tmp, config)

    write(["a"])
    options = ServerOptions(port=0, host="127.0.0.1", file_system_poll_wait_seconds=0,
                            model_config_file=str(config),
                            model_config_file_poll_wait_seconds=1)
    server = ModelServer(load_model_config_file(str(config)), options).start()
    try:
        assert [e.name for e in server.manager.entries()] == ["a"]
        write(["a", "b"])
        assert wait_for(lambda: server.manager.wait_until_available("b", timeout=0.01), 30)
        write(["b"])
        assert wait_for(lambda: [e.name for e in server.manager.entries()] == ["b"], 30)
        with caplog.at_level(logging.ERROR, logger="keras_hps.serving"):
            config.write_text("not a config {")
            assert wait_for(lambda: any("Failed to read ModelServerConfig file" in r.message
                                        for r in caplog.records), 30)
        assert server.manager.wait_until_available("b", timeout=1)
    finally:
        server.stop(grace=5)


def _manager(entries, loader, **kwargs) -> ModelManager:
    return ModelManager(entries, loader, poll_wait_seconds=0, **kwargs)


def test_load_retries(tmp_path):
    save_version(str(tmp_path / "m" / "1"), 3)
    calls: list[float] = []

    def flaky(path: str):
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise OSError("disk busy")
        return object()

    manager = _manager([ModelEntry("m", str(tmp_path / "m"))], flaky, load_retries=2,
                       retry_interval_s=0.1)
    manager.start()
    assert manager.status("m")[0].state == State.AVAILABLE
    assert len(calls) == 3 and calls[2] - calls[0] >= 0.2
    manager.close()
    calls.clear()
    once = _manager([ModelEntry("m", str(tmp_path / "m"))], flaky, load_retries=0)
    once.start()
    (status,) = once.status("m")
    assert status.state == State.END and "disk busy" in status.error.message
    assert len(calls) == 1
    once.close()


@pytest.mark.parametrize("threads, most", [(0, 1), (2, 2)])
def test_num_load_threads_bounds_loads_at_once(tmp_path, threads, most):
    for name in "abc":
        save_version(str(tmp_path / name / "1"), 4)
    lock, now, peak = threading.Lock(), [0], [0]

    def slow(path: str):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.3)
        with lock:
            now[0] -= 1
        return object()

    manager = _manager([ModelEntry(n, str(tmp_path / n)) for n in "abc"], slow,
                       load_threads=threads)
    manager.start()
    assert peak[0] == most
    manager.close()


def test_labels_on_a_config_change(tmp_path):
    """TF Serving's rule: a changed config may point a label only at an AVAILABLE version;
    with allow_version_labels_for_unavailable_models, also a new label at one loading."""
    for v in (1, 2):
        save_version(str(tmp_path / "m" / str(v)), v)
    from keras_hps.serving.model_config import VersionPolicy

    def entry(labels: dict, versions: tuple) -> ModelEntry:
        return ModelEntry("m", str(tmp_path / "m"), policy=VersionPolicy(
            "specific", versions=versions), labels=labels)

    for allow in (False, True):
        manager = _manager([entry({}, (1,))], lambda path: object(),
                           labels_for_unavailable=allow)
        manager.start()
        manager.reload_config([entry({"stable": 1}, (1,))])  # version 1 is AVAILABLE
        change = [entry({"stable": 1, "canary": 2}, (1, 2))]  # 2 is not loaded yet
        if allow:
            manager.reload_config(change)
            assert manager.entries()[0].labels == {"stable": 1, "canary": 2}
            # moving an existing label still needs an AVAILABLE version
            with pytest.raises(ServingError, match="Request to assign label to version 3"):
                manager.reload_config([entry({"stable": 3, "canary": 2}, (1, 2))])
        else:
            with pytest.raises(ServingError) as info:
                manager.reload_config(change)
            assert info.value.code == "FAILED_PRECONDITION"
            assert info.value.message == ("Request to assign label to version 2 of model m, "
                                          "which is not currently available for inference")
            assert manager.entries()[0].labels == {"stable": 1}  # the change was refused
        manager.close()


def test_deployment_doc_lists_every_flag():
    """docs/deployment.md's flag table is the one the flag definitions give."""
    doc = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + "/docs/deployment.md")
    with open(doc, encoding="utf-8") as f:
        assert cli.flags_markdown() in f.read()


def test_ssl_config_file_serves_grpc_over_tls(tmp_path):
    """--ssl_config_file: TF Serving's SSLConfig text proto; a TLS client with the server's
    certificate is answered, a plaintext one is not."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    key, cert = tmp_path / "server.key", tmp_path / "server.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    from google.protobuf import text_format

    from keras_hps.serving.protos import ssl_config_class

    config = ssl_config_class()(server_key=key.read_text(), server_cert=cert.read_text())
    ssl_file = tmp_path / "ssl.config"
    ssl_file.write_text(text_format.MessageToString(config))
    save_version(str(tmp_path / "m" / "1"), 6)
    options = ServerOptions(port=0, host="127.0.0.1", file_system_poll_wait_seconds=0,
                            ssl_config_file=str(ssl_file))
    server = ModelServer([ModelEntry("m", str(tmp_path / "m"))], options).start()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["ids"].CopyFrom(tf.make_tensor_proto(np.array([[1, 2]], np.int64)))
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 3), np.float32)))
    target = f"localhost:{server.grpc_port}"
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(target, credentials) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            assert stub.Predict(request, timeout=30).model_spec.version.value == 1
        with grpc.insecure_channel(target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=5)
