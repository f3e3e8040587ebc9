"""Small SavedModels for the serving tests, each with a NumPy reference of what it computes."""

from __future__ import annotations

import os
import shutil
import socket
import time

import numpy as np

VOCAB, DIM = 50, 4


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 10.0) -> bool:
    """Polls `predicate` until it is true (True) or `timeout` seconds pass (its last value)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def weights(seed: int) -> np.ndarray:
    """The embedding table of the version built with `seed`."""
    return np.random.default_rng(seed).normal(size=(VOCAB, DIM)).astype(np.float32)


def reference(seed: int, ids: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
    """What `serving_default` of the version built with `seed` answers."""
    emb = weights(seed)[ids]
    return {"emb": emb, "score": emb.sum(axis=(1, 2)) + x.sum(axis=1)}


def save_version(version_dir: str, seed: int) -> None:
    """Writes a SavedModel: serving_default(ids int64 [?,2], x float32 [?,3]) -> emb, score;
    'embed'(ids) -> vectors; 'echo'(text string [?]) -> text_bytes, length. Written to a
    temporary name and renamed, as an exporter does, so a polling server never sees half."""
    import tensorflow as tf

    class Model(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = tf.Variable(weights(seed))

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, 2], tf.int64, name="ids"),
                tf.TensorSpec([None, 3], tf.float32, name="x"),
            ]
        )
        def serve(self, ids, x):
            emb = tf.gather(self.table, ids)
            return {"emb": emb, "score": tf.reduce_sum(emb, axis=[1, 2]) + tf.reduce_sum(x, 1)}

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.int64, name="ids")])
        def embed(self, ids):
            return {"vectors": tf.gather(self.table, ids)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def echo(self, text):
            return {"text_bytes": text, "length": tf.strings.length(text)}

    model = Model()
    tmp = version_dir.rstrip("/") + ".tmp-writing"
    shutil.rmtree(tmp, ignore_errors=True)
    tf.saved_model.save(
        model,
        tmp,
        signatures={"serving_default": model.serve, "embed": model.embed, "echo": model.echo},
    )
    os.rename(tmp, version_dir)


def copy_version(src: str, dst: str) -> None:
    """Copies a version folder atomically (copy to a temporary name, then rename)."""
    tmp = dst.rstrip("/") + ".tmp-copying"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.rename(tmp, dst)


def save_tf1_half_plus_two(export_dir: str) -> None:
    """TF Serving's half_plus_two test model, built the way its
    `saved_model_half_plus_two.py` builds it (a TF1 graph, SavedModelBuilder): y = 0.5 x + 2,
    y2 = 0.5 x + 3 and y3 = 0.5 x2 + 3 over `tf.Example`s with float features x and x2
    (x2 defaults to 0). Signatures: serving_default (predict, x -> y), regress_x_to_y,
    regress_x_to_y2, regress_x2_to_y3 (its input is x2, not serialized examples),
    classify_x_to_y (scores only), and classify_x_to_classes (classes ["lo", "hi"] and
    scores [y, y2])."""
    import tensorflow as tf

    v1 = tf.compat.v1
    sm = v1.saved_model
    info = sm.utils.build_tensor_info
    consts = sm.signature_constants

    def signature(inputs: dict, outputs: dict, method: str):
        return sm.signature_def_utils.build_signature_def(
            {k: info(v) for k, v in inputs.items()}, {k: info(v) for k, v in outputs.items()},
            method)

    with tf.Graph().as_default() as graph, v1.Session(graph=graph) as sess:
        a, b, c = v1.Variable(0.5, name="a"), v1.Variable(2.0, name="b"), v1.Variable(3.0, name="c")
        serialized = v1.placeholder(tf.string, name="tf_example", shape=[None])
        parsed = v1.parse_example(serialized, {
            "x": v1.FixedLenFeature([1], tf.float32),
            "x2": v1.FixedLenFeature([1], tf.float32, default_value=[0.0]),
        })
        x = tf.identity(parsed["x"], name="x")
        y = tf.identity(a * x + b, name="y")
        y2 = tf.identity(a * x + c, name="y2")
        x2 = tf.identity(parsed["x2"], name="x2")
        a2, c2 = v1.Variable(0.5, name="a2"), v1.Variable(3.0, name="c2")
        y3 = tf.identity(a2 * x2 + c2, name="y3")
        scores = tf.concat([y, y2], 1, name="scores")
        classes = tf.tile(tf.constant([["lo", "hi"]]), [tf.shape(x)[0], 1], name="classes")
        regress, classify = consts.REGRESS_METHOD_NAME, consts.CLASSIFY_METHOD_NAME
        signatures = {
            "serving_default": signature({"x": x}, {"y": y}, consts.PREDICT_METHOD_NAME),
            "regress_x_to_y": signature({"inputs": serialized}, {"outputs": y}, regress),
            "regress_x_to_y2": signature({"inputs": serialized}, {"outputs": y2}, regress),
            "regress_x2_to_y3": signature({"inputs": x2}, {"outputs": y3}, regress),
            "classify_x_to_y": signature({"inputs": serialized}, {"scores": y}, classify),
            "classify_x_to_classes": signature(
                {"inputs": serialized}, {"classes": classes, "scores": scores}, classify),
        }
        sess.run(v1.global_variables_initializer())
        builder = sm.builder.SavedModelBuilder(export_dir)
        builder.add_meta_graph_and_variables(sess, ["serve"], signature_def_map=signatures)
        builder.save()


TF2_W = np.array([[0.5], [-1.0]], np.float32)
TF2_B = np.array([0.25], np.float32)


def save_tf2_classify_regress(export_dir: str) -> None:
    """A TF2 SavedModel (`tf.saved_model.save`) whose classify and regress signatures take
    serialized `tf.Example`s with a float feature x of 2 values: serving_default (predict,
    x [?, 2] -> y = x W + b), classify ("inputs" -> classes ["neg", "pos"], scores
    [1 - p, p] with p = sigmoid(y)) and regress ("inputs" -> outputs = y). TF2 signatures
    all have the predict method name, as TF Serving's enable_signature_method_name_check
    note says."""
    import tensorflow as tf

    class Model(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(TF2_W)
            self.b = tf.Variable(TF2_B)

        def _y(self, serialized):
            x = tf.io.parse_example(serialized, {"x": tf.io.FixedLenFeature([2], tf.float32)})
            return x["x"] @ self.w + self.b

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def predict(self, x):
            return {"y": x @ self.w + self.b}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def classify(self, inputs):
            p = tf.sigmoid(self._y(inputs))
            classes = tf.tile(tf.constant([[b"neg", b"pos"]]), [tf.shape(p)[0], 1])
            return {"classes": classes, "scores": tf.concat([1 - p, p], 1)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def regress(self, inputs):
            return {"outputs": self._y(inputs)}

    model = Model()
    tf.saved_model.save(model, export_dir, signatures={
        "serving_default": model.predict, "classify": model.classify, "regress": model.regress})


class ServeProcess:
    """`keras-hps serve FLAGS` as a subprocess, its output collected line by line.

    `with ServeProcess(*flags) as serve:` waits for the ready line (else fails with the
    output); on leaving, a server still running is killed."""

    def __init__(self, *flags: str, ready_timeout: float = 90.0) -> None:
        import subprocess
        import sys
        import threading

        self.lines: list[str] = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keras_hps.cli", "serve", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._ready_timeout = ready_timeout

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "keras-hps serve: ready" in line:
                self.ready.set()

    @property
    def output(self) -> str:
        """Everything the server printed so far."""
        return "".join(self.lines)

    def finish(self, timeout: float = 5.0) -> str:
        """The whole output, once the process has ended."""
        self._reader.join(timeout)
        return self.output

    def __enter__(self) -> ServeProcess:
        if not self.ready.wait(self._ready_timeout):
            self.proc.kill()
            raise AssertionError(f"keras-hps serve did not start:\n{self.finish()}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
