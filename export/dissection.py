"""Dissect a trained Keras 3 model: find its embedding tables and pull them out as
(int64 keys, float32 vectors)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from keras_hps.errors import ConfigError


@dataclass
class EmbeddingTable:
    """One embedding table of a model: row i of `vectors` serves key `keys[i]`.

    `layer_name` is the layer the table came from, `table_id` its index in the model's
    `hps.json` entry, `combiner` the combiner of a layer that pools bags (else None).
    Under TensorFlow `vectors` is a read-only view of the layer's weight, not a copy.
    """

    table_id: int
    layer_name: str
    keys: np.ndarray  # int64 [rows]
    vectors: np.ndarray  # float32 [rows, dim]
    combiner: str | None = None
    variable: Any = None  # the model variable `vectors` was read from (row order)

    def __repr__(self) -> str:
        return (f"EmbeddingTable(table_id={self.table_id}, layer_name={self.layer_name!r}, "
                f"rows={self.rows}, dim={self.dim}, combiner={self.combiner!r})")

    @property
    def dim(self) -> int:
        """Vector size."""
        return int(self.vectors.shape[1])

    @property
    def rows(self) -> int:
        """Number of keys."""
        return int(self.keys.shape[0])


def _is_embedding(layer: Any) -> bool:
    import keras

    return isinstance(layer, keras.layers.Embedding)


def _as_array(variable: Any) -> np.ndarray:
    """A variable's value as a NumPy array; under TensorFlow a view of its buffer (no copy:
    a 1M x 128 table would otherwise be copied twice)."""
    value = getattr(variable, "value", variable)
    if hasattr(value, "read_value"):
        return np.asarray(value.read_value())
    import keras

    return np.asarray(keras.ops.convert_to_numpy(value))


def _table_variable(layer: Any) -> Any:
    """The layer's single 2-D weight (the table)."""
    if _is_embedding(layer):
        return layer.embeddings
    two_d = [w for w in layer.weights if len(w.shape) == 2]
    if len(two_d) != 1:
        raise ConfigError(
            f"layer {layer.name!r} ({type(layer).__name__}) was named as an embedding table but "
            f"has {len(two_d)} 2-D weights ({[w.path for w in two_d]}); a table layer holds "
            "exactly one [rows, dim] weight"
        )
    return two_d[0]


def _all_layers(model: Any) -> list[Any]:
    """Every layer of `model` that may hold a table, parents before children: the layers of
    nested models, a DistributedEmbedding's table layers, and the sub-layers of other layers."""
    from keras_hps.export.graph import distributed_tables, is_distributed_embedding

    out: dict[int, Any] = {}
    for layer in model.layers:
        out.setdefault(id(layer), layer)
        if hasattr(layer, "layers") and layer is not model:
            for sub in _all_layers(layer):
                out.setdefault(id(sub), sub)
        elif is_distributed_embedding(layer):
            for sub in distributed_tables(layer).values():
                out.setdefault(id(sub), sub)
        elif hasattr(layer, "_flatten_layers"):
            for sub in layer._flatten_layers(include_self=False, recursive=True):
                out.setdefault(id(sub), sub)
    return list(out.values())


def find_table_layers(model: Any, embedding_layers: Sequence[str] | None = None) -> list[Any]:
    """The layers holding embedding tables: every `keras.layers.Embedding` (subclasses
    included) wherever it sits, or the named ones.

    Raises ConfigError for an unknown layer name, two tables of one name, or a model without
    any table.
    """
    layers = _all_layers(model)
    if embedding_layers is None:
        found = [layer for layer in layers if _is_embedding(layer)]
    else:
        by_name = {layer.name: layer for layer in layers}
        missing = [n for n in embedding_layers if n not in by_name]
        if missing:
            raise ConfigError(
                f"model {model.name!r} has no layer(s) named {missing}; its layers are "
                f"{sorted(by_name)}"
            )
        found = [by_name[n] for n in dict.fromkeys(embedding_layers)]
    if not found:
        raise ConfigError(
            f"model {model.name!r} has no embedding table: no keras.layers.Embedding found. "
            "Name the layers that hold tables with embedding_layers=[...]"
        )
    names = [layer.name for layer in found]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(
            f"model {model.name!r} has several table layers named {repeated} (in different "
            "sub-models); tables are named after their layer: give each a distinct name"
        )
    return found


def _keys_for(layer: Any, rows: int, given: Any) -> np.ndarray:
    if given is None:
        return np.arange(rows, dtype=np.int64)
    keys = np.asarray(given)
    if keys.ndim != 1 or keys.dtype.kind not in "iu":
        raise ConfigError(
            f"keys for table {layer.name!r} must be a 1-D integer array, got dtype "
            f"{keys.dtype} and shape {list(keys.shape)}"
        )
    if keys.shape[0] != rows:
        raise ConfigError(
            f"keys for table {layer.name!r} has {keys.shape[0]} entries but the table has "
            f"{rows} rows (row i serves key keys[i])"
        )
    if keys.dtype == np.uint64 and rows and keys.max() > np.iinfo(np.int64).max:
        raise ConfigError(f"keys for table {layer.name!r} exceed the int64 range")
    keys = keys.astype(np.int64, copy=False)
    # A sort and a neighbour compare: np.unique takes ~50x longer on 1M keys (NumPy 2.4).
    ordered = np.sort(keys)
    dup = np.flatnonzero(ordered[1:] == ordered[:-1])
    if len(dup):
        raise ConfigError(f"keys for table {layer.name!r} repeat (key {int(ordered[dup[0]])} "
                          f"and {len(dup) - 1} more): each row needs its own key")
    return keys


def dissect(
    model: Any,
    embedding_layers: Sequence[str] | None = None,
    keys: Mapping[str, Any] | None = None,
) -> list[EmbeddingTable]:
    """Pull each embedding table out of a trained model.

    Args:
        model: a built Keras 3 model.
        embedding_layers: names of the layers holding tables; default every
            `keras.layers.Embedding`. Other 2-D weights are left alone.
        keys: optional `{layer_name: key array}`; row i of that table serves key k_i
            (tables fed through hashing or vocabularies). Default: the row index.

    Returns:
        One `EmbeddingTable` per table layer, table ids in graph order.
    """
    layers = find_table_layers(model, embedding_layers)
    keys = dict(keys or {})
    unknown = sorted(set(keys) - {layer.name for layer in layers})
    if unknown:
        raise ConfigError(
            f"keys given for {unknown}, which are not table layers of {model.name!r} "
            f"(tables: {[layer.name for layer in layers]})"
        )
    tables = []
    for table_id, layer in enumerate(layers):
        variable = _table_variable(layer)
        weight = _as_array(variable)
        if weight.ndim != 2:
            raise ConfigError(
                f"table {layer.name!r} has shape {list(weight.shape)}, not [rows, dim]"
            )
        combiner = getattr(layer, "combiner", None)
        tables.append(
            EmbeddingTable(
                table_id=table_id,
                layer_name=layer.name,
                keys=_keys_for(layer, weight.shape[0], keys.get(layer.name)),
                vectors=np.ascontiguousarray(weight, dtype=np.float32),
                combiner=combiner if isinstance(combiner, str) else None,
                variable=variable,
            )
        )
    return tables
