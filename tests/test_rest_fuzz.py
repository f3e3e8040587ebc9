"""A seeded fuzz of the REST API against a real server on loopback: 10,000 mutated predict,
status and metadata requests (byte-level damage and hostile JSON values: deep nesting, more
dimensions than NumPy allows, huge numbers, ragged lists, wrong types, bad b64, lone
surrogates) sent over kept-alive connections. Every answer must be TF Serving's JSON, no
client mistake may get a 5xx, nothing may print a traceback, and the server keeps serving."""

from __future__ import annotations

import http.client
import json
import os
import random
import threading
import time

import numpy as np
import pytest

pytest.importorskip("tensorflow_serving")
pytest.importorskip("aiohttp")

from serving_models import free_port, reference, save_version  # noqa: E402

from keras_hps.serving import lazy_json  # noqa: E402
from keras_hps.serving.model_config import single_model  # noqa: E402
from keras_hps.serving.server import ModelServer, ServerOptions  # noqa: E402

REQUESTS = 10_000
CLIENTS = 3
SEED = 20260515


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fuzz_repo"))
    save_version(os.path.join(root, "m", "1"), seed=1)
    options = ServerOptions(port=0, rest_api_port=free_port(), host="127.0.0.1",
                            file_system_poll_wait_seconds=0)
    srv = ModelServer(single_model("m", os.path.join(root, "m")), options).start()
    yield srv
    srv.stop(grace=5)


TEMPLATES = [
    ("/v1/models/m:predict", {"instances": [{"ids": [1, 2], "x": [0.5, 0.0, 1.0]},
                                            {"ids": [3, 4], "x": [1.0, 2.0, 3.0]}]}),
    ("/v1/models/m:predict", {"inputs": {"ids": [[1, 2], [3, 4]], "x": [[0, 1, 2], [3, 4, 5]]}}),
    ("/v1/models/m/versions/1:predict",
     {"signature_name": "embed", "instances": [[1, 2], [7, 8], [9, 9]]}),
    ("/v1/models/m:predict", {"signature_name": "echo", "inputs": ["ab", {"b64": "aGk="}]}),
    ("/v1/models/m/labels/stable:predict", {"inputs": {"ids": [[1, 2]], "x": [[0, 0, 0]]}}),
]
HOSTILE = [
    lambda r: "[" * r.choice([100, 1000, 5000]) + "1" + "]" * r.choice([0, 100, 1000, 5000]),
    lambda r: "[" * 65 + "1" + "]" * 65,
    lambda r: "[" * 33 + "2" + "]" * 33,
    lambda r: r.choice(["1e300", "-1e309", "1e-400", "18446744073709551616", "9" * 300,
                        "-9223372036854775809", "NaN", "-Infinity", "0.1", "-0"]),
    lambda r: json.dumps([[1, 2], [3]]),
    lambda r: json.dumps([[1, 2], [3, [4]]]),
    lambda r: json.dumps([1, "a", None, True, {}, []]),
    lambda r: json.dumps({"b64": r.choice(["!!", "a", "====", "aGk", ""])}),
    lambda r: json.dumps({"b64": 5}),
    lambda r: '"\\ud800"',
    lambda r: json.dumps("é" * r.randint(0, 50)),
    lambda r: json.dumps({"ids": [1, 2]}),
    lambda r: json.dumps([[]] * r.randint(0, 5)),
    lambda r: "true",
    lambda r: "null",
    lambda r: json.dumps([[r.randint(-5, 60), r.randint(-5, 60)]] * r.randint(0, 40)),
    lambda r: json.dumps(np.random.default_rng(r.randint(0, 99)).random((3, 3)).tolist()),
]


def mutate_json(rng: random.Random, doc) -> str:
    """The document with one value, key or list replaced by something hostile (as text)."""
    marker = "\x00HOSTILE\x00"
    nodes = []

    def collect(value, parent, key):
        nodes.append((parent, key))
        if isinstance(value, dict):
            for k, v in value.items():
                collect(v, value, k)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                collect(v, value, i)

    doc = json.loads(json.dumps(doc))
    collect(doc, None, None)
    parent, key = rng.choice(nodes[1:])
    if isinstance(parent, dict) and rng.random() < 0.2:
        value = parent.pop(key)
        parent[rng.choice(["inputs", "instances", "signature_name", "ids", "x", "zz", ""])] = value
        return json.dumps(doc)
    parent[key] = marker
    return json.dumps(doc).replace(json.dumps(marker), rng.choice(HOSTILE)(rng))


def mutate_bytes(rng: random.Random, body: bytes) -> bytes:
    b = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        i = rng.randrange(len(b) + 1)
        if op < 0.3 and i < len(b):
            del b[i:i + rng.randint(1, 8)]
        elif op < 0.6:
            b[i:i] = bytes(rng.choice(b'[]{},:"\\-.e0123456789 \x00\xff') for _ in
                           range(rng.randint(1, 4)))
        elif op < 0.8 and i < len(b):
            b[i] = rng.randrange(256)
        else:
            b = b[: rng.randrange(len(b) + 1)]
    return bytes(b)


def make_requests(seed: int, n: int) -> list[tuple[str, str, bytes]]:
    rng = random.Random(seed)
    out = []
    for k in range(n):
        path, doc = rng.choice(TEMPLATES)
        r = rng.random()
        if r < 0.45:
            body = mutate_json(rng, doc).encode()
        elif r < 0.85:
            body = mutate_bytes(rng, json.dumps(doc).encode())
        elif r < 0.9:
            body = mutate_bytes(rng, mutate_json(rng, doc).encode())
        else:
            body = json.dumps(doc).encode()
        method = "POST"
        if k % 25 == 0:  # status and metadata routes, and odd paths, now and then
            method, body = "GET", b""
            path = rng.choice(["/v1/models/m", "/v1/models/m/metadata", "/v1/models/m/versions/"
                               "99999999999999999999", "/v1/models/%ff%00", "/v1/models/m/labels/"
                               "x/metadata", "/v1/models/" + "a" * 3000])
        out.append((method, path, body))
    return out


def test_ten_thousand_mutated_requests_get_no_5xx(server, monkeypatch, capfd):
    port = server.rest_port
    work = make_requests(SEED, REQUESTS)
    statuses: dict[int, int] = {}
    failures: list = []
    lock = threading.Lock()

    def client(items):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for method, path, body in items:
            try:
                conn.request(method, path, body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                status = response.status
            except (http.client.HTTPException, OSError) as exc:
                with lock:
                    failures.append((path, body[:200], repr(exc)))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
            if status >= 500 or (status != 200 and "error" not in json.loads(data)):
                with lock:
                    failures.append((path, body[:300], status, data[:300]))
            if response.getheader("Connection") == "close":
                conn.close()
        conn.close()

    start = time.monotonic()
    half = REQUESTS // 2
    for part, lazy_above in ((work[:half], lazy_json.LAZY_ABOVE), (work[half:], 64)):
        # the second half parses every body above 64 bytes the chunked way
        monkeypatch.setattr(lazy_json, "LAZY_ABOVE", lazy_above)
        threads = [threading.Thread(target=client, args=(part[i::CLIENTS],))
                   for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    elapsed = time.monotonic() - start
    assert not failures, failures[:5]
    assert sum(statuses.values()) == REQUESTS
    assert statuses.get(400, 0) > REQUESTS // 3 and statuses.get(200, 0) > REQUESTS // 20
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    print(f"{REQUESTS} requests in {elapsed:.1f} s: {dict(sorted(statuses.items()))}")
    # and it still answers correctly
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    ids, x = np.array([[1, 2], [3, 4]]), np.array([[0, 1, 2], [3, 4, 5]], np.float32)
    conn.request("POST", "/v1/models/m:predict",
                 json.dumps({"inputs": {"ids": ids.tolist(), "x": x.tolist()}}))
    out = json.loads(conn.getresponse().read())["outputs"]
    np.testing.assert_allclose(out["score"], reference(1, ids, x)["score"], rtol=1e-5, atol=1e-5)
