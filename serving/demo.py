"""`keras-hps demo --workdir DIR`: train -> export -> serve -> query -> check, end to end on CPU.

On synthetic Criteo-like data (13 dense features, 26 categorical features drawn Zipf over
scaled-down Criteo cardinalities), each step prints what it did:

1. train a small DLRM-style model whose 26 tables are `keras.layers.Embedding`;
2. export it to a TF Serving model repository with external tables (HDF5 + hps.json);
3. start `keras-hps serve` as a subprocess;
4. query it over gRPC with the official tensorflow-serving-api stubs and over REST;
5. check that the served answers match the trained model's;
6. print the parameter server's per-tier hit rates (from the Prometheus endpoint);
7. stop the server with SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from typing import Any

import numpy as np

# Criteo 1TB cardinalities (frequency threshold 15), capped for a CPU demo.
CRITEO_CARDINALITIES = (
    7912889,
    33823,
    17139,
    7339,
    20046,
    4,
    7105,
    1382,
    63,
    5554114,
    582469,
    245828,
    11,
    2209,
    10667,
    104,
    4,
    968,
    15,
    8165896,
    2675940,
    7156453,
    302516,
    12022,
    97,
    35,
)
NUM_DENSE = 13


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Demo options (defaults finish in a few minutes on a 2-core CPU)."""
    parser.add_argument("--workdir", default="demo_output", help="where everything is written")
    parser.add_argument("--samples", type=int, default=32768, help="training samples")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--dim", type=int, default=16, help="embedding dimension")
    parser.add_argument(
        "--max-rows",
        type=int,
        default=20000,
        help="cap on each table's rows (Criteo's largest have 8M)",
    )
    parser.add_argument("--query-batch", type=int, default=256, help="rows per query")
    parser.add_argument(
        "--host-cache-rate",
        type=float,
        default=0.1,
        help="hps.json volatile_db.initial_cache_rate for the served model (with --redis: "
        "volatile_db.host_cache_rate)",
    )
    parser.add_argument(
        "--redis",
        metavar="HOST:PORT[,...]",
        help="serve the tables from this Redis Cluster (volatile_db.type redis_cluster)",
    )
    parser.add_argument("--seed", type=int, default=0)


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/7] {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cardinalities(max_rows: int) -> list[int]:
    """Criteo's 26 table sizes, each capped at `max_rows`."""
    return [min(c, max_rows) for c in CRITEO_CARDINALITIES]


def synthetic_criteo(
    n: int, cards: list[int], seed: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Criteo-like features and click labels: log-normal dense counts, Zipf(1.2) categorical
    ids, and labels from a hidden logistic model so that there is something to learn."""
    rng = np.random.default_rng(seed)
    hidden = np.random.default_rng(1234)
    features: dict[str, np.ndarray] = {
        "dense_features": np.log1p(rng.lognormal(1.0, 1.2, size=(n, NUM_DENSE))).astype(np.float32)
    }
    logit = features["dense_features"] @ hidden.normal(0, 0.3, NUM_DENSE) - 1.0
    for i, card in enumerate(cards):
        ids = (rng.zipf(1.2, size=n) - 1) % card
        # scramble so that frequent ids are spread over the table
        ids = (ids * 2654435761 + i) % card
        features[f"C{i + 1}"] = ids.astype(np.int64).reshape(n, 1)
        logit += hidden.normal(0, 0.5, card)[ids]
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32).reshape(n, 1)
    return features, labels


def build_dlrm(cards: list[int], dim: int) -> Any:
    """A small DLRM: bottom MLP on dense features, one Embedding per categorical feature,
    pairwise dot-product interaction, top MLP with a sigmoid click probability."""
    import keras
    from keras import layers

    dense_in = keras.Input((NUM_DENSE,), name="dense_features", dtype="float32")
    cat_ins = [keras.Input((1,), name=f"C{i + 1}", dtype="int64") for i in range(len(cards))]
    bottom = layers.Dense(64, activation="relu")(dense_in)
    bottom = layers.Dense(dim, activation="relu")(bottom)
    vectors = [layers.Reshape((1, dim))(bottom)]
    for i, (card, ids) in enumerate(zip(cards, cat_ins, strict=True)):
        vectors.append(layers.Embedding(card, dim, name=f"emb_C{i + 1}")(ids))
    stacked = layers.Concatenate(axis=1)(vectors)  # [batch, 27, dim]
    pairs = layers.Dot(axes=(2, 2), name="dot_interaction")([stacked, stacked])
    interactions = layers.Flatten()(pairs)  # [batch, 27 * 27]
    top = layers.Concatenate()([bottom, interactions])
    top = layers.Dense(64, activation="relu")(top)
    out = layers.Dense(1, activation="sigmoid", name="click")(top)
    return keras.Model([dense_in, *cat_ins], out, name="dlrm")


def _wait_ready(proc: subprocess.Popen, lines: list[str], timeout: float) -> threading.Event:
    from .cli import READY_LINE

    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if READY_LINE in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(timeout)
    return ready


def tier_hit_rates(metrics_text: str, model: str) -> dict[str, tuple[float, float]]:
    """{tier: (hits, misses)} summed over a model's tables, from the Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    slot = {"keras_hps_tier_hits_total": 0, "keras_hps_tier_misses_total": 1}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in slot and sample.labels.get("model") == model:
                totals[sample.labels["tier"]][slot[sample.name]] += sample.value
    return {tier: (h, s) for tier, (h, s) in totals.items()}


def run(args: argparse.Namespace) -> int:
    """Run the seven steps; returns 0 when the served answers match the trained model."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t_start = time.perf_counter()
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    cards = cardinalities(args.max_rows)

    _step(1, "train a DLRM-style model with 26 keras.layers.Embedding tables")
    import keras

    keras.utils.set_random_seed(args.seed)
    features, labels = synthetic_criteo(args.samples, cards, args.seed)
    model = build_dlrm(cards, args.dim)
    model.compile(
        optimizer=keras.optimizers.Adam(0.003),
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc")],
    )
    t = time.perf_counter()
    history = model.fit(
        features, labels, batch_size=512, epochs=args.epochs, verbose=0, validation_split=0.1
    )
    rows = sum(cards)
    print(
        f"    {args.samples} synthetic Criteo-like samples; 26 tables, {rows:,} rows x "
        f"dim {args.dim} ({rows * args.dim * 4 / 2**20:.1f} MiB of embeddings)"
    )
    print(
        f"    trained {args.epochs} epochs in {time.perf_counter() - t:.1f} s: "
        f"loss {history.history['loss'][-1]:.4f}, "
        f"validation AUC {history.history['val_auc'][-1]:.3f}"
    )
    keras_path = os.path.join(workdir, "dlrm.keras")
    model.save(keras_path)
    print(f"    saved {keras_path}")

    _step(2, "export it as a TF Serving model repository, tables external (HDF5 + hps.json)")
    import shutil

    # through the command line, as a user would (serving never imports the exporter)
    repo = os.path.join(workdir, "model_repository")
    shutil.rmtree(repo, ignore_errors=True)
    import json

    # the repository's hps.json settings go into every version exported after them
    os.makedirs(repo)
    hps_json = os.path.join(repo, "hps.json")
    volatile_db: dict[str, Any] = {"initial_cache_rate": args.host_cache_rate}
    if args.redis:
        volatile_db = {"type": "redis_cluster", "address": args.redis,
                       "host_cache_rate": args.host_cache_rate}
    with open(hps_json, "w", encoding="utf-8") as f:
        json.dump({"supportlonglong": True, "models": [], "volatile_db": volatile_db}, f,
                  indent=2)
    if args.redis:
        print(f"    volatile_db in {hps_json}: the Redis Cluster at {args.redis}, filled from "
              f"the HDF5 tables once; {args.host_cache_rate} of each table in host RAM in front")
    else:
        print(
            f"    volatile_db.initial_cache_rate = {args.host_cache_rate} in {hps_json}: the "
            "host RAM tier starts with that share of each table, the rest is read from HDF5 "
            "on use"
        )
    export_cmd = [
        sys.executable,
        "-m",
        "keras_hps.cli",
        "export",
        keras_path,
        "--repo",
        repo,
        "--name",
        "dlrm",
        "--tables",
        "external",
        "--max-batch-size",
        "65536",
        "--quiet",
    ]
    print("    keras-hps " + " ".join(export_cmd[3:]))
    t = time.perf_counter()
    done = subprocess.run(
        export_cmd, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    )
    if done.returncode != 0:
        print(f"    export failed:\n{done.stdout}{done.stderr}", file=sys.stderr)
        return 1
    out_lines = done.stdout.strip().splitlines()
    table_lines = [ln for ln in out_lines if ln.lstrip().startswith("table:")]
    for line in [ln for ln in out_lines if ln not in table_lines] + table_lines[:2]:
        print(f"    | {line}")
    if len(table_lines) > 2:
        print(f"    | ... and {len(table_lines) - 2} more tables")
    models_config = os.path.join(repo, "models.config")
    tables = sorted(
        os.path.join(root, f)
        for root, _, files in os.walk(repo)
        for f in files
        if f.endswith(".h5")
    )
    print(
        f"    export took {time.perf_counter() - t:.1f} s in its own process; "
        f"{len(tables)} HDF5 table files under {os.path.join(repo, 'tables')}"
    )

    print(f"    each version pins its tables and that config: {repo}/dlrm/1/hps.json")

    _step(3, "start the server: keras-hps serve --model_config_file ... (a subprocess)")
    grpc_port, rest_port = _free_port(), _free_port()
    cmd = [
        sys.executable,
        "-m",
        "keras_hps.cli",
        "serve",
        f"--model_config_file={models_config}",
        f"--port={grpc_port}",
        f"--rest_api_port={rest_port}",
        "--host=127.0.0.1",
    ]
    print("    " + " ".join(cmd[2:]))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: list[str] = []
    try:
        if not _wait_ready(proc, lines, 180).is_set():
            print("    the server did not start:\n" + "".join(lines), file=sys.stderr)
            return 1
        print(
            f"    ready in {time.perf_counter() - t:.1f} s: gRPC on 127.0.0.1:{grpc_port}, "
            f"REST on 127.0.0.1:{rest_port}"
        )
        return _query_and_check(args, model, cards, grpc_port, rest_port, proc, lines, t_start)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _query_and_check(
    args: argparse.Namespace,
    model: Any,
    cards: list[int],
    grpc_port: int,
    rest_port: int,
    proc: subprocess.Popen,
    lines: list[str],
    t_start: float,
) -> int:
    import grpc
    import requests
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    _step(4, "query it over gRPC (official stubs) and over REST (JSON)")
    queries, _ = synthetic_criteo(args.query_batch, cards, args.seed + 1)
    # a few keys the tables never saw: they get the default vector, like any HPS miss
    queries["C1"][:3] = np.array([[cards[0] + 5], [10**12], [cards[0]]])
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "dlrm"
    request.model_spec.signature_name = "serving_default"
    for name, value in queries.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    t = time.perf_counter()
    response = stub.Predict(request, 30.0)
    grpc_ms = (time.perf_counter() - t) * 1e3
    (out_name,) = response.outputs
    served_grpc = tf.make_ndarray(response.outputs[out_name]).reshape(-1)
    print(
        f"    gRPC Predict: {args.query_batch} rows in {grpc_ms:.1f} ms, served by version "
        f"{response.model_spec.version.value}; first scores {np.round(served_grpc[:4], 4)}"
    )
    body = {"inputs": {k: v.tolist() for k, v in queries.items()}}
    t = time.perf_counter()
    r = requests.post(f"http://127.0.0.1:{rest_port}/v1/models/dlrm:predict", json=body, timeout=60)
    rest_ms = (time.perf_counter() - t) * 1e3
    if r.status_code != 200:
        print(f"    REST predict failed: {r.status_code} {r.text}", file=sys.stderr)
        return 1
    served_rest = np.asarray(r.json()["outputs"], np.float32).reshape(-1)
    print(
        f"    REST :predict: {args.query_batch} rows in {rest_ms:.1f} ms (HTTP "
        f"{r.status_code}); first scores {np.round(served_rest[:4], 4)}"
    )
    meta = requests.get(f"http://127.0.0.1:{rest_port}/v1/models/dlrm/metadata", timeout=10)
    sig = meta.json()["metadata"]["signature_def"]["signature_def"]["serving_default"]
    shown = []
    for name in ("C1", "C26", "dense_features"):
        info = sig["inputs"][name]
        dims = ",".join(
            "?" if int(d["size"]) < 0 else d["size"] for d in info["tensor_shape"]["dim"]
        )
        shown.append(f"{name}: {info['dtype'][3:].lower()} [{dims}]")
    print(
        f"    GET /v1/models/dlrm/metadata -> serving_default takes raw keys: "
        f"{', '.join(shown)}, ... ({len(sig['inputs'])} inputs)"
    )
    status = requests.get(f"http://127.0.0.1:{rest_port}/v1/models/dlrm", timeout=10).json()
    print(f"    GET /v1/models/dlrm -> {status['model_version_status']}")

    _step(5, "check the served answers against the trained Keras model")
    unseen = queries["C1"][:3].copy()
    local = dict(queries)
    # the trained Embedding cannot take unseen ids; the server answers them with the
    # default vector (zeros), so compare those three rows against a zero embedding
    local["C1"] = np.where(local["C1"] < cards[0], local["C1"], 0)
    want = model.predict(local, batch_size=args.query_batch, verbose=0).reshape(-1)
    emb = model.get_layer("emb_C1")
    saved = emb.embeddings.numpy().copy()
    try:
        emb.embeddings.assign(np.where(np.arange(cards[0])[:, None] == 0, 0.0, saved))
        want_unseen = model.predict({k: v[:3] for k, v in local.items()}, verbose=0).reshape(-1)
    finally:
        emb.embeddings.assign(saved)
    want[:3] = want_unseen
    err_grpc = float(np.max(np.abs(served_grpc - want)))
    err_rest = float(np.max(np.abs(served_rest - want)))
    ok = err_grpc < 1e-5 and err_rest < 1e-5
    print(
        f"    max |served - trained|: gRPC {err_grpc:.2e}, REST {err_rest:.2e} over "
        f"{len(want)} rows (3 with unseen keys {unseen.reshape(-1).tolist()} -> default "
        f"vector) -> {'MATCH' if ok else 'MISMATCH'}"
    )

    _step(6, "per-tier hit rates of the parameter server (from /monitoring/prometheus/metrics)")
    for _ in range(3):  # a few more queries so the caches have seen repeated keys
        stub.Predict(request, 30.0)
    text = requests.get(
        f"http://127.0.0.1:{rest_port}/monitoring/prometheus/metrics", timeout=10
    ).text
    rates = tier_hit_rates(text, "dlrm")
    if not rates:
        print("    (the server reported no per-table counters)")
    for tier, (hits, misses) in rates.items():
        if tier == "default":
            print(f"    unknown keys answered with the default vector: {int(hits)}")
            continue
        seen = hits + misses
        rate = f"{hits / seen:6.1%}" if seen else "   n/a"
        print(f"    {tier:8s} hits {int(hits):8d}  misses {int(misses):8d}  hit rate {rate}")

    _step(7, "stop the server (SIGTERM: in-flight requests finish, then it exits)")
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    print(f"    server exited with code {code}")
    print(
        f"\ndemo finished in {time.perf_counter() - t_start:.0f} s: "
        f"{'served answers match the trained model' if ok else 'ANSWERS DO NOT MATCH'}"
    )
    return 0 if ok and code == 0 else 1
