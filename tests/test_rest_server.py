"""The REST frontend against a real ModelServer on loopback, queried with real HTTP clients
(http.client with keep-alive, requests, raw sockets for malformed framing): keep-alive,
chunked and gzip bodies, malformed headers, timeouts, the body limit and the memory it
bounds, methods, CORS, the connection cap, the Prometheus endpoint and draining."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import socket
import threading
import time

import numpy as np
import pytest
import requests

pytest.importorskip("tensorflow_serving")
pytest.importorskip("aiohttp")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from serving_models import free_port, reference, save_version  # noqa: E402

from keras_hps.serving.model_config import single_model  # noqa: E402
from keras_hps.serving.server import ModelServer, ServerOptions  # noqa: E402

TIMEOUT_MS = 1500
MAX_BODY = 24 << 20
SLOW_ID = 49  # a request whose first id is 49 sleeps ids[0, 1] / 10 seconds in the model


class SlowWhenAsked:
    """A loaded version whose run() sleeps for requests that ask for it."""

    def __init__(self, servable):
        self._servable = servable

    def __getattr__(self, name):
        return getattr(self._servable, name)

    def run(self, inputs, signature_name="serving_default", output_keys=None):
        ids = inputs.get("ids")
        if ids is not None and ids.size >= 2 and int(ids.flat[0]) == SLOW_ID:
            time.sleep(int(ids.flat[1]) / 10)
        return self._servable.run(inputs, signature_name, output_keys)


def slow_loader(path):
    from keras_hps.servable import load_servable

    return SlowWhenAsked(load_servable(path))


WIDE = 64


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("rest_repo"))
    save_version(os.path.join(root, "m", "1"), seed=1)
    return os.path.join(root, "m")


@pytest.fixture(scope="module")
def wide_repo(tmp_path_factory):
    """'wide': serving_default(x float32 [?, 64]) -> total = x.sum(1): a large request, a
    small answer."""
    import tensorflow as tf

    class Wide(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, WIDE], tf.float32, name="x")])
        def serve(self, x):
            return {"total": tf.reduce_sum(x, axis=1)}

    root = str(tmp_path_factory.mktemp("wide_repo"))
    module = Wide()
    tf.saved_model.save(module, os.path.join(root, "1"),
                        signatures={"serving_default": module.serve})
    return root


def make_server(repo, tmp_path_factory, monitoring=None, more=(), **rest):
    options = ServerOptions(port=0, rest_api_port=free_port(), host="127.0.0.1",
                            file_system_poll_wait_seconds=0)
    for name, value in rest.items():  # the REST flags (fields of ServerOptions once merged)
        setattr(options, name, value)
    if monitoring is not None:
        path = tmp_path_factory.mktemp("monitoring") / "monitoring.config"
        path.write_text(monitoring)
        options.monitoring_config_file = str(path)
    entries = single_model("m", repo) + list(more)
    return ModelServer(entries, options, loader=slow_loader).start()


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    srv = make_server(repo, tmp_path_factory,
                      monitoring='prometheus_config { enable: true, path: "/metrics" }',
                      rest_api_timeout_in_ms=TIMEOUT_MS, rest_api_max_body_bytes=MAX_BODY,
                      rest_api_num_threads=4)
    yield srv
    srv.stop(grace=5)


@pytest.fixture(scope="module")
def cors_server(repo, wide_repo, tmp_path_factory):
    srv = make_server(repo, tmp_path_factory, monitoring="prometheus_config { enable: false }",
                      more=single_model("wide", wide_repo),
                      rest_api_enable_cors_support=True, rest_api_max_connections=4)
    yield srv
    srv.stop(grace=5)


@pytest.fixture(autouse=True)
def no_tracebacks(capfd, caplog):
    yield
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


def predict_body(ids, x) -> bytes:
    return json.dumps({"inputs": {"ids": np.asarray(ids).tolist(),
                                  "x": np.asarray(x).tolist()}}).encode()


def check_answer(data: bytes, ids, x) -> None:
    out = json.loads(data)["outputs"]
    want = reference(1, np.asarray(ids), np.asarray(x, np.float32))
    np.testing.assert_allclose(np.array(out["score"], np.float32), want["score"], rtol=1e-5,
                               atol=1e-5)


def exchange(port: int, data: bytes, wait: float = 5.0, shutdown: bool = False) -> bytes:
    """Sends raw bytes and returns everything read until the server closes (or `wait`)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(data)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        s.settimeout(wait)
        out = b""
        try:
            while chunk := s.recv(1 << 16):
                out += chunk
        except TimeoutError:
            out += b"<still open>"
        return out


def status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def still_serving(port: int) -> None:
    r = requests.post(f"http://127.0.0.1:{port}/v1/models/m:predict",
                      data=predict_body([[1, 2]], [[0, 0, 1]]), timeout=10)
    assert r.status_code == 200, r.text


def vm(field: str) -> int:
    """A memory figure of this process (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        return int(f.read().split(field + ":", 1)[1].split()[0]) * 1024


def reset_peak_rss() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return vm("VmRSS")


# ---------------------------------------------------------------- keep-alive, chunked, gzip
def test_kept_alive_connection_answers_every_request_without_nagle_stalls(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
    rng = np.random.default_rng(0)
    times, sockets = [], set()
    for _ in range(40):
        ids, x = rng.integers(0, 40, (32, 2)), rng.random((32, 3))
        start = time.perf_counter()
        conn.request("POST", "/v1/models/m:predict", predict_body(ids, x),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        times.append(time.perf_counter() - start)
        sockets.add(id(conn.sock))
        assert response.status == 200 and response.getheader("Connection") != "close"
        check_answer(data, ids, x)
    assert len(sockets) == 1  # one connection served all of them
    # Nagle's algorithm with delayed ACKs stalls each kept-alive answer about 40 ms
    assert sorted(times)[len(times) // 2] < 0.02, times


def test_chunked_bodies_and_the_next_request_on_the_connection(server):
    ids, x = [[3, 4], [5, 6]], [[0.5, 0, 1], [2, 2, 2]]
    body = predict_body(ids, x)
    conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
    pieces = (body[i:i + 7] for i in range(0, len(body), 7))
    conn.request("POST", "/v1/models/m:predict", pieces, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 200
    check_answer(response.read(), ids, x)
    conn.request("GET", "/v1/models/m")  # exactly one answer per request, then the next one
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["model_version_status"]
    raw = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:5], body[5:], b""))
    answer = exchange(server.rest_port, b"POST /v1/models/m:predict HTTP/1.1\r\nHost: h\r\n"
                      b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + raw)
    assert answer.count(b"HTTP/1.1 ") == 1
    check_answer(answer.partition(b"\r\n\r\n")[2], ids, x)


def test_gzip_bodies_are_decoded_and_bad_gzip_is_400(server):
    ids, x = [[7, 8]], [[1, 1, 1]]
    url = f"http://127.0.0.1:{server.rest_port}/v1/models/m:predict"
    r = requests.post(url, data=gzip.compress(predict_body(ids, x)),
                      headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    check_answer(r.content, ids, x)
    r = requests.post(url, data=b"\x1f\x8b\x08\x00not gzip at all",
                      headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "Malformed request body" in r.json()["error"]
    # 200 MB of zeros in 200 KB: refused at the limit while it is being decompressed
    bomb = gzip.compress(b" " * (200 << 20), compresslevel=9)
    base = reset_peak_rss()
    r = requests.post(url, data=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "exceeds the limit" in r.json()["error"]
    assert vm("VmHWM") - base < 2 * MAX_BODY
    still_serving(server.rest_port)


# ---------------------------------------------------------------- malformed requests, timeouts
@pytest.mark.parametrize("request_bytes, message", [
    (b"POST /v1/models/m:predict HTTP/1.1\r\nHost: h\r\nContent-Length: abc\r\n\r\n",
     "Content-Length"),
    (b"POST /v1/models/m:predict HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n", "Malformed HTTP request"),
    (b"GARBAGE\r\n\r\n", "Malformed HTTP request"),
    (b"GET /v1/models/m HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
     "Malformed HTTP request"),
    (b"GET /v1/models/m HTTP/1.1\r\nBad Header Line\r\n\r\n", "Malformed HTTP request"),
    (b"POST /v1/models/m:predict HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"zz\r\nxx\r\n0\r\n\r\n", "Malformed"),
])
def test_malformed_framing_is_a_json_400(server, request_bytes, message):
    status, doc = status_and_json(exchange(server.rest_port, request_bytes))
    assert status == 400 and message in doc["error"], doc
    assert "\n" not in doc["error"]
    still_serving(server.rest_port)


def test_idle_and_slow_connections_are_closed_after_the_timeout(server):
    port, limit = server.rest_port, TIMEOUT_MS / 1000
    start = time.monotonic()
    assert exchange(port, b"", wait=limit + 3) == b""  # a connection that sends nothing
    assert limit - 0.1 <= time.monotonic() - start < limit + 2
    start = time.monotonic()
    assert exchange(port, b"POST /v1/models/m:pred", wait=limit + 3) == b""  # headers stall
    assert time.monotonic() - start < limit + 2
    start = time.monotonic()  # a body shorter than its Content-Length
    answer = exchange(port, b"POST /v1/models/m:predict HTTP/1.1\r\nHost: h\r\n"
                      b"Content-Length: 100\r\n\r\n{", wait=limit + 3)
    status, doc = status_and_json(answer)
    assert status == 408 and "rest_api_timeout_in_ms=1500" in doc["error"]
    assert time.monotonic() - start < limit + 2
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # idle after an answer
    conn.request("GET", "/v1/models/m")
    assert conn.getresponse().read()
    time.sleep(limit + 0.5)
    assert conn.sock.recv(1) == b""  # closed by the server
    still_serving(port)


def test_a_model_call_longer_than_the_timeout_is_504_and_the_server_keeps_serving(server):
    r = requests.post(f"http://127.0.0.1:{server.rest_port}/v1/models/m:predict",
                      data=predict_body([[SLOW_ID, 30]], [[0, 0, 0]]), timeout=10)
    assert r.status_code == 504 and "rest_api_timeout_in_ms" in r.json()["error"]
    still_serving(server.rest_port)


# ---------------------------------------------------------------- the body limit and memory
def test_oversize_bodies_are_refused_before_they_are_read(server):
    port = server.rest_port
    base = reset_peak_rss()
    start = time.monotonic()  # the announced length alone is refused: no body is sent
    status, doc = status_and_json(exchange(
        port, b"POST /v1/models/m:predict HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n"
        % (10 * MAX_BODY)))
    assert status == 400 and f"limit of {MAX_BODY} bytes" in doc["error"]
    assert time.monotonic() - start < 1.0
    with socket.create_connection(("127.0.0.1", port)) as s:  # a chunked body, counted
        s.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: h\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (1 << 16, b"[" * (1 << 16))
        sent = 0
        try:
            while sent < 4 * MAX_BODY:
                s.sendall(chunk)
                sent += 1 << 16
        except OSError:
            pass  # refused and closed
        s.settimeout(5)
        answer = b""
        try:
            while data := s.recv(1 << 16):
                answer += data
        except OSError:
            pass
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"exceeds the limit" in answer
    assert vm("VmHWM") - base < 2 * MAX_BODY
    still_serving(port)


def test_expect_100_continue_asks_for_the_body_only_when_it_fits(server):
    body = predict_body([[1, 2]], [[0, 0, 1]])
    with socket.create_connection(("127.0.0.1", server.rest_port)) as s:
        s.settimeout(5)
        s.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        assert s.recv(1 << 16).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(body)
        answer = b""
        while chunk := s.recv(1 << 16):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    check_answer(answer.partition(b"\r\n\r\n")[2], [[1, 2]], [[0, 0, 1]])
    status, doc = status_and_json(exchange(
        server.rest_port, b"POST /v1/models/m:predict HTTP/1.1\r\nHost: h\r\nExpect: "
        b"100-continue\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)))
    assert status == 400 and "exceeds the limit" in doc["error"]


def test_a_large_valid_body_costs_a_small_multiple_of_its_size(cors_server):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 100, (50_000, WIDE)) / 100  # values like 0.37: 6 bytes each
    body = json.dumps({"instances": x.tolist()}).encode()
    assert 16 << 20 < len(body) < 24 << 20
    conn = http.client.HTTPConnection("127.0.0.1", cors_server.rest_port, timeout=60)
    conn.request("POST", "/v1/models/wide:predict", body[:2_000_000].rsplit(b"],", 1)[0] + b"]]}")
    assert conn.getresponse().read()  # TensorFlow's first call of the model costs memory once
    base = reset_peak_rss()
    conn.request("POST", "/v1/models/wide:predict", body)
    response = conn.getresponse()
    data = response.read()
    grew = vm("VmHWM") - base
    assert response.status == 200
    np.testing.assert_allclose(json.loads(data)["predictions"], x.sum(axis=1), rtol=1e-5)
    # the body's copy, its structure scan, the float32 inputs and TensorFlow's copy of them:
    # about 4 times the body, where json.loads took about 13 times (benchmarks/serving.md)
    assert grew < 5 * len(body), grew / len(body)


# ---------------------------------------------------------------- methods and CORS
@pytest.mark.parametrize("method", ["PATCH", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_on_the_api_are_tf_servings_400(server, method):
    r = requests.request(method, f"http://127.0.0.1:{server.rest_port}/v1/models/m")
    assert r.status_code == 400
    assert r.json()["error"] == f"Malformed request: {method} /v1/models/m"
    assert "Access-Control-Allow-Origin" not in r.headers


def test_head_trace_and_paths_outside_the_api(server):
    base = f"http://127.0.0.1:{server.rest_port}"
    r = requests.head(f"{base}/v1/models/m")
    assert r.status_code == 400 and r.content == b""
    r = requests.request("TRACE", f"{base}/v1/models/m")
    assert r.status_code == 501 and r.json()["error"] == "Method not implemented: TRACE"
    r = requests.get(f"{base}/v2/models/m")
    assert r.status_code == 404 and r.headers["Content-Type"] == "application/json"
    still_serving(server.rest_port)


def test_cors_headers_and_preflight_behind_the_flag(cors_server):
    base = f"http://127.0.0.1:{cors_server.rest_port}"
    r = requests.options(f"{base}/v1/models/m:predict", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200 and r.content == b""
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert r.headers["Access-Control-Allow-Methods"] == "POST, GET"
    assert r.headers["Access-Control-Allow-Headers"] == "Content-Type"
    r = requests.post(f"{base}/v1/models/m:predict", data=predict_body([[1, 2]], [[0, 0, 0]]),
                      headers={"Origin": "https://app.example"})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
    r = requests.get(f"{base}/v1/models/nope")
    assert r.status_code == 404 and r.headers["Access-Control-Allow-Origin"] == "*"
    r = requests.options(f"{base}/v1/models/m")  # not a preflight: no Origin
    assert r.status_code == 400 and "Malformed request: OPTIONS" in r.json()["error"]


def test_connection_cap(cors_server):
    port = cors_server.rest_port
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        time.sleep(0.2)
        answer = exchange(port, b"GET /v1/models/m HTTP/1.1\r\nHost: h\r\n\r\n")
        status, doc = status_and_json(answer)
        assert status == 503 and "Too many open connections" in doc["error"]
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while True:  # the slots free up once the held connections are gone
        r = requests.get(f"http://127.0.0.1:{port}/v1/models/m")
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200


# ---------------------------------------------------------------- metrics
def test_metrics_at_the_configured_path_parse_as_prometheus_text(server, cors_server):
    base = f"http://127.0.0.1:{server.rest_port}"
    for _ in range(3):
        still_serving(server.rest_port)
    requests.post(f"{base}/v1/models/m:predict", data=b"{")
    r = requests.get(f"{base}/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    count = families[":tensorflow:serving:request_count"]
    assert count.type == "counter" and count.documentation
    by_status = {s.labels["status"]: s.value for s in count.samples
                 if s.labels["model_name"] == "m"}
    assert by_status["OK"] >= 3 and by_status["INVALID_ARGUMENT"] >= 1
    latency = families[":tensorflow:serving:request_latency"]
    assert latency.type == "histogram"
    assert any(s.labels.get("entrypoint") == "REST" and s.labels.get("API") == "predict"
               for s in latency.samples)
    assert requests.get(f"{base}/monitoring/prometheus/metrics").status_code == 404
    r = requests.get(f"{base}/metrics?x=1")
    assert r.status_code == 400 and r.text == "Unexpected path: /metrics?x=1. Should be /metrics"
    # enable: false turns the endpoint off; and servers do not share counters
    other = f"http://127.0.0.1:{cors_server.rest_port}"
    assert requests.get(f"{other}/monitoring/prometheus/metrics").status_code == 404
    ok_before = cors_server.metrics.request_count("m")
    still_serving(server.rest_port)
    assert cors_server.metrics.request_count("m") == ok_before
    assert server.metrics.request_count("m") >= 4


# ---------------------------------------------------------------- draining
def test_stop_answers_requests_already_received_and_refuses_new_ones(repo, tmp_path_factory):
    srv = make_server(repo, tmp_path_factory, rest_api_timeout_in_ms=20_000)
    port = srv.rest_port
    results = {}

    def slow():
        results["slow"] = requests.post(f"http://127.0.0.1:{port}/v1/models/m:predict",
                                        data=predict_body([[SLOW_ID, 10]], [[0, 0, 0]]),
                                        timeout=30)

    client = threading.Thread(target=slow)
    client.start()
    time.sleep(0.3)  # the slow request is in the model now
    stopper = threading.Thread(target=srv.stop, kwargs={"grace": 10})
    stopper.start()
    time.sleep(0.2)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/v1/models/m", timeout=5)
    client.join(30)
    stopper.join(30)
    assert results["slow"].status_code == 200
    check_answer(results["slow"].content, [[SLOW_ID, 10]], [[0, 0, 0]])


def test_rest_limits_come_from_the_server_options():
    from keras_hps.serving.rest import rest_limits

    options = ServerOptions()
    limits = rest_limits(options)  # TF Serving's defaults, and keras-hps's own limits
    assert limits.timeout_s == 30.0 and limits.max_body_bytes == 256 << 20
    assert limits.num_threads == 4 * (os.cpu_count() or 1)
    assert 16 <= limits.max_connections <= 1024
    options.rest_api_timeout_in_ms, options.rest_api_num_threads = 0, 3
    options.rest_api_max_body_bytes, options.rest_api_max_connections = 10, 7
    limits = rest_limits(options)
    assert limits.timeout_s == 86_400.0  # TF Serving: no timeout
    assert (limits.num_threads, limits.max_body_bytes, limits.max_connections) == (3, 10, 7)
    options.rest_api_timeout_in_ms = 250
    assert rest_limits(options).timeout_s == 0.25
