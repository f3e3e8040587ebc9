"""Build the inference model (LookupLayer in place of each embedding), and from it the
embedded placement's graph (native TF lookups). The external placement's split is in
`keras_hps.export.split`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras

from keras_hps.errors import ConfigError
from keras_hps.export.dissection import EmbeddingTable, dissect, find_table_layers
from keras_hps.export.embedded import EmbeddedLookup
from keras_hps.export.graph import LookupCall, Rewired, is_graph_model, rewire
from keras_hps.layers.base_layer import input_kind


def _lookup_layer_types() -> tuple[type, ...]:
    from keras_hps.layers.base_layer import TableLookupLayer

    return (TableLookupLayer,)


def _pools(table: EmbeddingTable, ids: Any) -> bool:
    """Whether a call of `table`'s layer on `ids` pools bags (a combiner and ids of rank 2+,
    as keras-rs `EmbedReduce` does), or the ids arrive sparse or ragged."""
    if ids is not None and input_kind(ids) != "dense":
        return True
    return table.combiner is not None and (ids is None or len(ids.shape) >= 2)


def _lookup_factory(tables: Sequence[EmbeddingTable], model_name: str) -> Any:
    """`replace_lookup` for `rewire`: one keras_hps lookup layer per (table layer, pooling)."""
    from keras_hps.layers import LookupLayer, SparseLookupLayer

    by_layer = {t.layer_name: t for t in tables}
    made: dict[tuple[str, bool], Any] = {}

    def make(layer: Any, ids: Any) -> Any:
        table = by_layer[layer.name]
        pooled = _pools(table, ids)
        if (layer.name, pooled) not in made:
            kind = SparseLookupLayer if pooled else LookupLayer
            extra = {"combiner": table.combiner or "mean"} if pooled else {}
            # A layer called both per id and on bags gets two lookup layers.
            name = layer.name if (layer.name, not pooled) not in made else (
                f"{layer.name}_{'bags' if pooled else 'ids'}")
            new = kind(model_name, table.table_id, table.dim, name=name,
                       emb_vec_dtype=_float_dtype(getattr(layer, "compute_dtype", "float32")),
                       **extra)
            # Nothing to build: skip the check against a parameter server, which need not
            # hold this model while exporting (it is bound when the layer first runs).
            new.built = True
            made[(layer.name, pooled)] = new
        return made[(layer.name, pooled)]

    return make


def _float_dtype(dtype: Any) -> str:
    dtype = str(dtype)
    return dtype if "float" in dtype else "float32"


def build_inference_model(
    model: keras.Model,
    model_name: str,
    tables: Sequence[EmbeddingTable] | None = None,
    embedding_layers: Sequence[str] | None = None,
    keys: Mapping[str, Any] | None = None,
) -> keras.Model:
    """The trained model's graph with `LookupLayer` / `SparseLookupLayer` in place of each
    embedding, bound to `model_name` and table ids (graph order); dense weights copied.

    Tables are found in nested sub-models (inlined into one graph), inside layers that hold
    one as an attribute (the layer is copied with the table swapped) and in keras-rs
    `DistributedEmbedding` layers (one lookup per feature). Subclassed models cannot be
    rewritten: ConfigError says what to pass instead.
    """
    return rewire_inference(model, model_name, tables, embedding_layers, keys).model


def rewire_inference(
    model: keras.Model,
    model_name: str,
    tables: Sequence[EmbeddingTable] | None = None,
    embedding_layers: Sequence[str] | None = None,
    keys: Mapping[str, Any] | None = None,
) -> Rewired:
    """`build_inference_model`, with its lookup calls and the layers holding tables."""
    if not is_graph_model(model):
        raise ConfigError(
            f"model {model.name!r} is a subclassed keras.Model: its call() cannot be rewritten. "
            "Export a functional or Sequential model, or build the inference model yourself "
            "(the same computation with keras_hps.LookupLayer(model_name, table_id, dim) in "
            "place of each embedding) and pass it as inference_model=, naming the table layers "
            "with embedding_layers=[...]"
        )
    if tables is None:
        tables = dissect(model, embedding_layers, keys)
    layers = {id(layer) for layer in find_table_layers(model, [t.layer_name for t in tables])}
    return rewire(model, is_lookup=lambda layer: id(layer) in layers,
                  replace_lookup=_lookup_factory(tables, model_name), copy_layers=True)


def lookup_calls(inference: keras.Model, model_name: str) -> Rewired:
    """Every table lookup of an inference model (checked to be bound to `model_name`)."""
    types = _lookup_layer_types()
    rewired = rewire(
        inference,
        is_lookup=lambda layer: isinstance(layer, types),
        replace_lookup=lambda layer, ids: layer,
        copy_layers=False,
    )
    for layer in [c.layer for c in rewired.calls]:
        if layer.model_name != model_name:
            raise ConfigError(
                f"inference model layer {layer.name!r} is bound to model "
                f"{layer.model_name!r}, but the export is named {model_name!r}"
            )
    if not rewired.calls and not rewired.holders:
        raise ConfigError(f"inference model {inference.name!r} has no keras_hps lookup layer")
    return rewired


def check_against_tables(calls: Sequence[LookupCall], tables: Sequence[EmbeddingTable]) -> None:
    """Every lookup names an existing table with the right vector size."""
    for call in calls:
        tid = call.layer.table_id
        if not 0 <= tid < len(tables):
            raise ConfigError(
                f"lookup layer {call.layer.name!r} reads table {tid}, but the model has "
                f"{len(tables)} table(s)"
            )
        if call.layer.emb_vec_size != tables[tid].dim:
            raise ConfigError(
                f"lookup layer {call.layer.name!r} has emb_vec_size {call.layer.emb_vec_size} "
                f"but table {tid} ({tables[tid].layer_name!r}) has dim {tables[tid].dim}"
            )


def embedded_model(
    inference: keras.Model,
    tables: Sequence[EmbeddingTable],
    default_values: Sequence[float],
) -> keras.Model:
    """The inference model with each lookup read from SavedModel variables by native TF ops."""
    types = _lookup_layer_types()
    made: dict[int, EmbeddedLookup] = {}

    def replace(layer: Any, ids: Any) -> EmbeddedLookup:
        # One table read by several layers is stored once.
        tid = layer.table_id
        if tid not in made:
            table = tables[tid]
            made[tid] = EmbeddedLookup(
                table.keys, table.vectors, default_values[tid],
                combiner=getattr(layer, "combiner", None), variable=table.variable,
                output_dtype=layer.emb_vec_dtype, name=f"hps_table_{tid}",
            )
        return made[tid]

    return rewire(inference, is_lookup=lambda layer: isinstance(layer, types),
                  replace_lookup=replace, copy_layers=False).model
