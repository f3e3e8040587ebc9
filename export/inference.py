"""Build the inference model (LookupLayer in place of each embedding), and from it the two
graphs that get exported: the embedded model and the external placement's dense part."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras

from keras_hps.errors import ConfigError
from keras_hps.export.dissection import EmbeddingTable, dissect, find_table_layers
from keras_hps.export.embedded import EmbeddedLookup
from keras_hps.export.graph import LookupCall, input_names, is_graph_model, rewire


def _lookup_layer_types() -> tuple[type, ...]:
    from keras_hps.layers.base_layer import TableLookupLayer

    return (TableLookupLayer,)


def _is_sparse_call(layer: Any) -> bool:
    """Whether the embedding layer was fed sparse or ragged ids in the trained model."""
    from keras_hps.layers.base_layer import input_kind

    for node in getattr(layer, "_inbound_nodes", []):
        for t in node.input_tensors:
            if input_kind(t) != "dense":
                return True
    return False


def _make_lookup_layer(layer: Any, table: EmbeddingTable, model_name: str) -> Any:
    from keras_hps.layers import LookupLayer, SparseLookupLayer

    if table.combiner is not None or _is_sparse_call(layer):
        new = SparseLookupLayer(
            model_name, table.table_id, table.dim, combiner=table.combiner or "mean",
            name=layer.name,
        )
    else:
        new = LookupLayer(model_name, table.table_id, table.dim, name=layer.name)
    # Nothing to build: skip the check against a parameter server, which need not hold this
    # model while exporting (it is bound when the layer first runs).
    new.built = True
    return new


def build_inference_model(
    model: keras.Model,
    model_name: str,
    tables: Sequence[EmbeddingTable] | None = None,
    embedding_layers: Sequence[str] | None = None,
    keys: Mapping[str, Any] | None = None,
) -> keras.Model:
    """The trained model's graph with `LookupLayer` / `SparseLookupLayer` in place of each
    embedding, bound to `model_name` and table ids (graph order); dense weights copied.

    Subclassed models cannot be rewritten: ConfigError says what to pass instead.
    """
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
    by_layer = {t.layer_name: t for t in tables}
    layers = {id(layer): layer for layer in find_table_layers(model, list(by_layer))}
    inference, _ = rewire(
        model,
        is_lookup=lambda layer: id(layer) in layers,
        replace_lookup=lambda layer: _make_lookup_layer(layer, by_layer[layer.name], model_name),
        copy_layers=True,
    )
    return inference


def lookup_calls(inference: keras.Model, model_name: str) -> list[LookupCall]:
    """Every table lookup of an inference model (checked to be bound to `model_name`)."""
    types = _lookup_layer_types()
    _, calls = rewire(
        inference,
        is_lookup=lambda layer: isinstance(layer, types),
        replace_lookup=lambda layer: layer,
        copy_layers=False,
    )
    for call in calls:
        if call.layer.model_name != model_name:
            raise ConfigError(
                f"inference model layer {call.layer.name!r} is bound to model "
                f"{call.layer.model_name!r}, but the export is named {model_name!r}"
            )
    if not calls:
        raise ConfigError(f"inference model {inference.name!r} has no keras_hps lookup layer")
    return calls


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

    def replace(layer: Any) -> EmbeddedLookup:
        # One table read by several layers is stored once.
        tid = layer.table_id
        if tid not in made:
            table = tables[tid]
            made[tid] = EmbeddedLookup(
                table.keys, table.vectors, default_values[tid],
                combiner=getattr(layer, "combiner", None), variable=table.variable,
                name=f"hps_table_{tid}",
            )
        return made[tid]

    model, _ = rewire(
        inference,
        is_lookup=lambda layer: isinstance(layer, types),
        replace_lookup=replace,
        copy_layers=False,
    )
    return model


@dataclass
class DensePart:
    """The external placement's dense part and how its inputs relate to the public ones."""

    model: keras.Model
    input_names: list[str]  # dense-part inputs, in model.inputs order
    feeds: list[tuple[LookupCall, str]]  # each lookup call and the dense-part input it feeds
    passthrough: list[str]  # public inputs fed to the dense part unchanged


def dense_part(inference: keras.Model, calls: Sequence[LookupCall]) -> DensePart:
    """Cut the inference graph at its lookups: their outputs become inputs."""
    rewired, calls = rewire(
        inference,
        is_lookup=lambda layer: isinstance(layer, _lookup_layer_types()),
        replace_lookup=lambda layer: layer,
        copy_layers=False,
    )
    for call in calls:
        if call.input_name is None:
            raise ConfigError(
                f"lookup layer {call.layer.name!r} is fed by a computed tensor, not a model "
                "input; the external placement resolves keys that arrive as model inputs. "
                "Export with tables='embedded', or make the keys a model input"
            )
    names = input_names(rewired)
    key_inputs = {c.input_name for c in calls}
    feeds = [(c, f"hps_lookup_{i}") for i, c in enumerate(calls)]
    feed_tensors = [c.output for c in calls]
    others = [(n, t) for n, t in zip(names, rewired.inputs, strict=True) if n not in key_inputs]
    try:
        model = keras.Model([t for _, t in others] + feed_tensors, rewired.outputs)
        passthrough = [n for n, _ in others]
    except ValueError:
        # Some key input is also used by a dense layer: feed it to the dense part as well.
        model = keras.Model(list(rewired.inputs) + feed_tensors, rewired.outputs)
        passthrough = list(names)
    return DensePart(model, passthrough + [f for _, f in feeds], feeds, passthrough)
