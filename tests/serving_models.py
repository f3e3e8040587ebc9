"""Small SavedModels for the serving tests, each with a NumPy reference of what it computes."""

from __future__ import annotations

import os
import shutil
import socket

import numpy as np

VOCAB, DIM = 50, 4


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
