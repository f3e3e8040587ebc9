"""The model shapes users train, for the export matrix: each a small Keras model, fresh
inputs for it (ids and strings never seen in training included), export options, and which
placement refuses it (by a message naming the layer).

Custom classes are registered with `keras.saving.register_keras_serializable`, as a user's
module would, so the CLI can load them with `--custom-module tests.export_models`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

ops = keras.ops
WORDS = [f"w{i}" for i in range(12)]


@keras.saving.register_keras_serializable(package="keras_hps_tests")
class BagEmbedding(keras.layers.Embedding):
    """An Embedding that pools bags padded with -1 (sum | mean | sqrtn)."""

    def __init__(self, *args: Any, combiner: str = "mean", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.combiner = combiner

    def call(self, ids: Any) -> Any:
        mask = ops.cast(ids >= 0, "float32")
        vecs = ops.take(self.embeddings, ops.maximum(ids, 0), axis=0) * mask[..., None]
        total = ops.sum(vecs, axis=-2)
        if self.combiner == "sum":
            return total
        count = ops.sum(mask, axis=-1, keepdims=True)
        scale = count if self.combiner == "mean" else ops.sqrt(count)
        return ops.divide_no_nan(total, scale)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return (*input_shape[:-1], self.output_dim)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "combiner": self.combiner}


@keras.saving.register_keras_serializable(package="keras_hps_tests")
class TakeTable(keras.layers.Layer):
    """A table that is not an Embedding: one [rows, dim] weight read by row."""

    def __init__(self, rows: int, dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows, self.dim = rows, dim

    def build(self, input_shape: Any) -> None:
        self.table = self.add_weight(shape=(self.rows, self.dim), initializer="normal")

    def call(self, ids: Any) -> Any:
        return ops.take(self.table, ops.cast(ids, "int32"), axis=0)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rows": self.rows, "dim": self.dim}


@keras.saving.register_keras_serializable(package="keras_hps_tests")
class ItemTower(keras.layers.Layer):
    """A custom layer that owns its table: embeds ids, pools them, projects."""

    def __init__(self, rows: int, dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows, self.dim = rows, dim
        self.table = keras.layers.Embedding(rows, dim, embeddings_initializer="normal",
                                            name="item_table")
        self.proj = keras.layers.Dense(dim, activation="tanh", name="proj")

    def call(self, ids: Any) -> Any:
        return self.proj(ops.mean(self.table(ids), axis=1))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rows": self.rows, "dim": self.dim}


@keras.saving.register_keras_serializable(package="keras_hps_tests")
class Bucketize(keras.layers.Layer):
    """Custom preprocessing: ids -> (ids * 7 + 3) mod rows, computed in the graph."""

    def __init__(self, rows: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows = rows

    def call(self, ids: Any) -> Any:
        return ops.mod(ids * 7 + 3, self.rows)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rows": self.rows}


@dataclass
class Case:
    """One model shape of the matrix."""

    build: Callable[[], keras.Model]
    inputs: Callable[[np.random.Generator, int], dict[str, np.ndarray]]
    export: dict[str, Any] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # placement -> message part
    # The served request for the trained model's inputs (raw keys where the export was
    # given key arrays); default the same inputs.
    request: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = lambda x: x


def _emb(rows: int, dim: int, name: str, **kw: Any) -> keras.layers.Embedding:
    return keras.layers.Embedding(rows, dim, embeddings_initializer="normal", name=name, **kw)


def _head(x: Any, name: str = "score") -> Any:
    x = keras.layers.Dense(6, activation="relu", name=f"{name}_hidden")(x)
    return keras.layers.Dense(1, name=name)(x)


def _ints(rng: np.random.Generator, high: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, high, shape).astype(np.int64)


def _floats(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


# -- the shapes that exported before the keys step ------------------------------------------

def ids_flatten() -> keras.Model:
    ids = keras.Input((3,), dtype="int64", name="ids")
    return keras.Model(ids, _head(keras.layers.Flatten()(_emb(30, 4, "emb")(ids))))


def dict_two_tables() -> keras.Model:
    user = keras.Input((1,), dtype="int64", name="user")
    items = keras.Input((3,), dtype="int64", name="items")
    dense = keras.Input((2,), name="dense")
    eu = keras.layers.Flatten()(_emb(20, 4, "emb_user")(user))
    ei = keras.layers.GlobalAveragePooling1D()(_emb(25, 3, "emb_item")(items))
    return keras.Model({"user": user, "items": items, "dense": dense},
                       _head(keras.layers.Concatenate()([eu, ei, dense])))


def list_inputs() -> keras.Model:
    a = keras.Input((2,), dtype="int64", name="a")
    b = keras.Input((1,), dtype="int32", name="b")
    x = keras.layers.Concatenate()([keras.layers.Flatten()(_emb(15, 3, "ea")(a)),
                                    keras.layers.Flatten()(_emb(9, 2, "eb")(b))])
    return keras.Model([a, b], _head(x))


def sequential() -> keras.Model:
    return keras.Sequential([keras.Input((3,), dtype="int64", name="seq_ids"),
                             _emb(30, 5, "seq_emb"), keras.layers.Flatten(),
                             keras.layers.Dense(2, name="seq_head")], name="seq")


def shared_table_as_feature() -> keras.Model:
    a = keras.Input((1,), dtype="int64", name="a")
    b = keras.Input((2,), dtype="int64", name="b")
    emb = _emb(30, 4, "shared")
    x = keras.layers.Concatenate()([keras.layers.Flatten()(emb(a)), keras.layers.Flatten()(emb(b)),
                                    ops.cast(a, "float32") / 30.0])
    return keras.Model([a, b], _head(x))


def pooled_bags() -> keras.Model:
    bags = keras.Input((4,), dtype="int64", name="bags")
    pooled = BagEmbedding(25, 6, combiner="sqrtn", embeddings_initializer="normal",
                          name="bag_emb")(bags)
    return keras.Model(bags, _head(pooled))


def _bags(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    ids = _ints(rng, 25, (n, 4))
    ids[0] = -1  # an empty bag
    ids[1 % n, 2:] = -1
    return {"bags": ids}


def named_take_table() -> keras.Model:
    ids = keras.Input((2,), dtype="int64", name="ids")
    other = keras.Input((2,), dtype="int64", name="other")
    a = keras.layers.Flatten()(_emb(20, 4, "emb")(ids))
    b = keras.layers.Flatten()(TakeTable(15, 3, name="take")(other))
    return keras.Model([ids, other], _head(keras.layers.Concatenate()([a, b])))


def variable_length() -> keras.Model:
    ids = keras.Input((None,), dtype="int64", name="ids")
    pooled = keras.layers.GlobalAveragePooling1D()(_emb(9, 3, "var")(ids))
    return keras.Model(ids, _head(pooled))


def multi_output() -> keras.Model:
    ids = keras.Input((2,), dtype="int64", name="ids")
    dense = keras.Input((3,), name="dense")
    x = keras.layers.Concatenate()([keras.layers.Flatten()(_emb(40, 4, "emb")(ids)), dense])
    return keras.Model({"ids": ids, "dense": dense},
                       {"ctr": _head(x, "ctr"), "cvr": _head(x, "cvr")})


def rank1_ids() -> keras.Model:
    ids = keras.Input((), dtype="int64", name="ids")
    return keras.Model(ids, _head(_emb(17, 4, "emb")(ids)))


def sequence_pooling() -> keras.Model:
    ids = keras.Input((5,), dtype="int64", name="history")
    x = keras.layers.GlobalMaxPooling1D()(_emb(33, 4, "history_emb")(ids))
    return keras.Model(ids, _head(x))


def hashed_keys() -> keras.Model:
    ids = keras.Input((2,), dtype="int64", name="raw_ids")
    return keras.Model(ids, _head(keras.layers.Flatten()(_emb(12, 3, "hashed")(ids))))


HASHED_KEYS = (np.arange(12, dtype=np.int64) * 1_000_003 + 2**40)




# -- keys the graph computes ----------------------------------------------------------------

def dlrm_slices() -> keras.Model:
    cat = keras.Input((4,), dtype="int64", name="cat")
    dense = keras.Input((3,), name="dense")
    embs = [_emb(10 + i, 4, f"cat_{i}")(cat[:, i]) for i in range(4)]
    bottom = keras.layers.Dense(4, activation="relu", name="bottom")(dense)
    return keras.Model({"cat": cat, "dense": dense},
                       _head(keras.layers.Concatenate()([bottom, *embs])))


def _dlrm_inputs(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {"cat": _ints(rng, 10, (n, 4)), "dense": _floats(rng, (n, 3))}


def hashing_ints() -> keras.Model:
    ids = keras.Input((2,), dtype="int64", name="ids")
    hashed = keras.layers.Hashing(num_bins=50, name="hash")(ids)
    return keras.Model(ids, _head(keras.layers.Flatten()(_emb(50, 4, "hashed_emb")(hashed))))


def integer_lookup() -> keras.Model:
    ids = keras.Input((1,), dtype="int64", name="ids")
    index = keras.layers.IntegerLookup(vocabulary=[3, 9, 27, 81, 243], name="vocab")(ids)
    return keras.Model(ids, _head(keras.layers.Flatten()(_emb(6, 4, "vocab_emb")(index))))


def string_lookup() -> keras.Model:
    words = keras.Input((2,), dtype="string", name="words")
    dense = keras.Input((1,), name="dense")
    index = keras.layers.StringLookup(vocabulary=WORDS[:8], name="words_vocab")(words)
    x = keras.layers.Flatten()(_emb(9, 3, "words_emb")(index))
    return keras.Model({"words": words, "dense": dense},
                       _head(keras.layers.Concatenate()([x, dense])))


def _words(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # WORDS[8:] and "never-seen" were not in the vocabulary: the OOV row.
    pool = np.array([w.encode() for w in WORDS] + [b"never-seen"], dtype=object)
    return pool[rng.integers(0, len(pool), shape)]


def string_hashing() -> keras.Model:
    city = keras.Input((1,), dtype="string", name="city")
    hashed = keras.layers.Hashing(num_bins=16, name="city_hash")(city)
    return keras.Model(city, _head(keras.layers.Flatten()(_emb(16, 4, "city_emb")(hashed))))


def index_as_feature() -> keras.Model:
    """A StringLookup whose index feeds the table and, as a number, the dense layers: the
    keys step computes it once and passes it on."""
    words = keras.Input((1,), dtype="string", name="word")
    index = keras.layers.StringLookup(vocabulary=WORDS[:6], name="vocab")(words)
    x = keras.layers.Concatenate()([keras.layers.Flatten()(_emb(7, 3, "word_emb")(index)),
                                    ops.cast(index, "float32") / 7.0])
    return keras.Model(words, _head(x))


def custom_preprocessing() -> keras.Model:
    ids = keras.Input((3,), dtype="int64", name="ids")
    buckets = Bucketize(13, name="bucketize")(ids)
    return keras.Model(ids, _head(keras.layers.Flatten()(_emb(13, 2, "bucket_emb")(buckets))))


def two_tower() -> keras.Model:
    def tower(name: str, rows: int, width: int) -> keras.Model:
        ids = keras.Input((width,), dtype="int64", name=f"{name}_in")
        x = keras.layers.GlobalAveragePooling1D()(_emb(rows, 4, f"{name}_emb")(ids))
        return keras.Model(ids, keras.layers.Dense(3, name=f"{name}_proj")(x), name=name)

    user = keras.Input((1,), dtype="int64", name="user")
    item = keras.Input((2,), dtype="int64", name="item")
    score = keras.layers.Dot(axes=1)([tower("user_tower", 20, 1)(user),
                                      tower("item_tower", 30, 2)(item)])
    return keras.Model({"user": user, "item": item}, score)


def sequential_tower() -> keras.Model:
    tower = keras.Sequential([_emb(25, 4, "tower_emb"), keras.layers.Flatten(),
                              keras.layers.Dense(3, name="tower_dense")], name="tower")
    ids = keras.Input((2,), dtype="int64", name="ids")
    return keras.Model(ids, _head(tower(ids)))


def custom_layer_table() -> keras.Model:
    ids = keras.Input((3,), dtype="int64", name="ids")
    return keras.Model(ids, _head(ItemTower(21, 4, name="item_tower")(ids)))


def half_table(dtype: str) -> Callable[[], keras.Model]:
    def build() -> keras.Model:
        ids = keras.Input((2,), dtype="int64", name="ids")
        x = keras.layers.Flatten()(_emb(19, 4, f"{dtype}_emb", dtype=dtype)(ids))
        return keras.Model(ids, _head(ops.cast(x, "float32")))
    build.__name__ = f"{dtype}_table"
    return build


def embed_reduce() -> keras.Model:
    import keras_rs

    bags = keras.Input((3,), dtype="int64", name="bags")
    single = keras.Input((), dtype="int64", name="single")
    pooled = keras_rs.layers.EmbedReduce(22, 4, combiner="mean", name="bag_reduce",
                                         embeddings_initializer="normal")(bags)
    one = keras_rs.layers.EmbedReduce(11, 2, combiner="sum", name="one_reduce",
                                      embeddings_initializer="normal")(single)
    return keras.Model({"bags": bags, "single": single},
                       _head(keras.layers.Concatenate()([pooled, one])))


def distributed_embedding() -> keras.Model:
    import keras_rs

    rs = keras_rs.layers
    user = rs.TableConfig(name="user_table", vocabulary_size=20, embedding_dim=4,
                          combiner="mean", placement="default_device",
                          initializer="normal")
    item = rs.TableConfig(name="item_table", vocabulary_size=30, embedding_dim=4,
                          combiner="sum", placement="default_device", initializer="normal")
    features = {
        "user": rs.FeatureConfig(name="user", table=user, input_shape=(None, 1),
                                 output_shape=(None, 4)),
        "clicks": rs.FeatureConfig(name="clicks", table=item, input_shape=(None, 3),
                                   output_shape=(None, 4)),
        "item": rs.FeatureConfig(name="item", table=item, input_shape=(None, 1),
                                 output_shape=(None, 4)),
    }
    inputs = {"user": keras.Input((1,), dtype="int64", name="user"),
              "clicks": keras.Input((3,), dtype="int64", name="clicks"),
              "item": keras.Input((1,), dtype="int64", name="item")}
    out = rs.DistributedEmbedding(features, name="distributed")(inputs)
    x = keras.layers.Concatenate()([out["user"], out["clicks"], out["item"]])
    return keras.Model(inputs, _head(x))


EXTERNAL_CUSTOM_LAYER = "layer 'item_tower' reads table"

CASES: dict[str, Case] = {
    "ids_flatten": Case(ids_flatten, lambda r, n: {"ids": _ints(r, 30, (n, 3))}),
    "dict_two_tables": Case(dict_two_tables, lambda r, n: {
        "user": _ints(r, 20, (n, 1)), "items": _ints(r, 25, (n, 3)),
        "dense": _floats(r, (n, 2))}),
    "list_inputs": Case(list_inputs, lambda r, n: {
        "a": _ints(r, 15, (n, 2)), "b": _ints(r, 9, (n, 1)).astype(np.int32)}),
    "sequential": Case(sequential, lambda r, n: {"seq_ids": _ints(r, 30, (n, 3))}),
    "shared_table_as_feature": Case(shared_table_as_feature, lambda r, n: {
        "a": _ints(r, 30, (n, 1)), "b": _ints(r, 30, (n, 2))}),
    "pooled_bags": Case(pooled_bags, _bags),
    "named_take_table": Case(named_take_table, lambda r, n: {
        "ids": _ints(r, 20, (n, 2)), "other": _ints(r, 15, (n, 2))},
        export={"embedding_layers": ["emb", "take"]}),
    "variable_length": Case(variable_length, lambda r, n: {"ids": _ints(r, 9, (n, 4))},
                            export={"max_keys_per_sample": {"var": 6}}),
    "multi_output": Case(multi_output, lambda r, n: {
        "ids": _ints(r, 40, (n, 2)), "dense": _floats(r, (n, 3))}),
    "rank1_ids": Case(rank1_ids, lambda r, n: {"ids": _ints(r, 17, (n,))}),
    "sequence_pooling": Case(sequence_pooling, lambda r, n: {"history": _ints(r, 33, (n, 5))}),
    "hashed_keys": Case(hashed_keys, lambda r, n: {"raw_ids": _ints(r, 12, (n, 2))},
                        export={"keys": {"hashed": HASHED_KEYS}},
                        request=lambda x: {"raw_ids": HASHED_KEYS[x["raw_ids"]]}),
    "dlrm_slices": Case(dlrm_slices, _dlrm_inputs),
    "hashing_ints": Case(hashing_ints, lambda r, n: {
        "ids": r.integers(-2**40, 2**40, (n, 2)).astype(np.int64)}),
    "integer_lookup": Case(integer_lookup, lambda r, n: {
        "ids": np.array([3, 9, 27, 81, 243, 5, 0, -1], np.int64)[r.integers(0, 8, (n, 1))]}),
    "string_lookup": Case(string_lookup, lambda r, n: {
        "words": _words(r, (n, 2)), "dense": _floats(r, (n, 1))}),
    "string_hashing": Case(string_hashing, lambda r, n: {"city": _words(r, (n, 1))}),
    "index_as_feature": Case(index_as_feature, lambda r, n: {"word": _words(r, (n, 1))}),
    "custom_preprocessing": Case(custom_preprocessing, lambda r, n: {
        "ids": r.integers(0, 10**9, (n, 3)).astype(np.int64)}),
    "two_tower": Case(two_tower, lambda r, n: {
        "user": _ints(r, 20, (n, 1)), "item": _ints(r, 30, (n, 2))}),
    "sequential_tower": Case(sequential_tower, lambda r, n: {"ids": _ints(r, 25, (n, 2))}),
    "custom_layer_table": Case(custom_layer_table, lambda r, n: {"ids": _ints(r, 21, (n, 3))},
                               refused={"external": EXTERNAL_CUSTOM_LAYER}),
    "float16_table": Case(half_table("float16"), lambda r, n: {"ids": _ints(r, 19, (n, 2))}),
    "bfloat16_table": Case(half_table("bfloat16"), lambda r, n: {"ids": _ints(r, 19, (n, 2))}),
    "embed_reduce": Case(embed_reduce, lambda r, n: {
        "bags": _ints(r, 22, (n, 3)), "single": _ints(r, 11, (n,))}),
    "distributed_embedding": Case(distributed_embedding, lambda r, n: {
        "user": _ints(r, 20, (n, 1)), "clicks": _ints(r, 30, (n, 3)),
        "item": _ints(r, 30, (n, 1))}),
}


def saved_model_ops(version_dir: str) -> set[str]:
    """Every op type in a SavedModel's graphs and their function library."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(f"{version_dir}/saved_model.pb", "rb") as f:
        saved.ParseFromString(f.read())
    ops: set[str] = set()
    for graph in saved.meta_graphs:
        ops |= {node.op for node in graph.graph_def.node}
        for function in graph.graph_def.library.function:
            ops |= {node.op for node in function.node_def}
    return ops
