"""Walking and rewriting the graph of a functional (or Sequential) Keras 3 model.

Every rewrite the exporter does (Embedding -> LookupLayer, LookupLayer -> native TF lookup,
LookupLayer output -> model input) goes through `rewire`, which re-calls the model's layers
on fresh inputs and records every call of a layer picked out as a table lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras

from keras_hps.errors import ConfigError


def is_graph_model(model: Any) -> bool:
    """Whether the model's graph can be rewritten (functional or Sequential)."""
    from keras.src.models.functional import Functional

    return isinstance(model, (Functional, keras.Sequential))


def as_functional(model: keras.Model) -> keras.Model:
    """The model as a functional model over the same layers (Sequential -> functional)."""
    if isinstance(model, keras.Sequential):
        if not model.built or not model.inputs:
            raise ConfigError(
                f"Sequential model {model.name!r} is not built; build it (keras.Input as its "
                "first layer, or call it once) before exporting"
            )
        return keras.Model(model.inputs, model.outputs, name=model.name)
    return model


def input_names(model: keras.Model) -> list[str]:
    """Signature names of the model's inputs, in `model.inputs` order.

    Dict inputs keep their keys; otherwise each input is named after its Input layer.
    """
    struct = model.input
    if isinstance(struct, dict):
        by_id = {id(t): k for k, t in struct.items()}
        return [by_id[id(t)] for t in model.inputs]
    return [t._keras_history.operation.name for t in model.inputs]


def call_with_named_inputs(model: keras.Model, names: list[str], inputs: dict[str, Any]) -> Any:
    """Call `model` on `inputs` keyed by `input_names(model)`, in the model's input structure."""
    if isinstance(model.input, dict):
        return model(dict(inputs), training=False)
    values = [inputs[n] for n in names]
    return model(values if len(values) > 1 else values[0], training=False)


def output_names(model: keras.Model) -> list[str]:
    """Names of the model's outputs, aligned with `model.outputs`.

    Dict outputs keep their keys; others take their output layer's name (`output_<i>` when
    those repeat).
    """
    struct = model.output
    if isinstance(struct, dict):
        by_id = {id(t): k for k, t in struct.items()}
        return [by_id[id(t)] for t in model.outputs]
    names = [t._keras_history.operation.name for t in model.outputs]
    if len(set(names)) != len(names):
        names = [f"output_{i}" for i in range(len(names))]
    return names


def flat_outputs(result: Any) -> list[Any]:
    """A model call's result flattened in `model.outputs` order."""
    return list(keras.tree.flatten(result))


@dataclass
class LookupCall:
    """One call of a table lookup in a rewired graph."""

    original: Any  # the layer in the source model
    layer: Any  # the layer the rewired graph calls
    ids: Any  # KerasTensor fed to it in the rewired graph
    output: Any  # KerasTensor it returned
    input_name: str | None  # the model input the ids come straight from, if any


def rewire(
    model: keras.Model,
    is_lookup: Callable[[Any], bool],
    replace_lookup: Callable[[Any], Any],
    copy_layers: bool,
) -> tuple[keras.Model, list[LookupCall]]:
    """Re-create `model`'s graph with each lookup layer replaced by `replace_lookup(layer)`.

    Other layers are copied (new objects, same weights) when `copy_layers`, else shared.
    Returns the new functional model and every lookup call in it, in graph order.
    """
    source = as_functional(model)
    names = input_names(source)
    new_inputs = [
        keras.Input(batch_shape=t.shape, dtype=t.dtype, name=n, sparse=t.sparse, ragged=t.ragged)
        for t, n in zip(source.inputs, names, strict=True)
    ]
    input_of = {id(t): n for t, n in zip(new_inputs, names, strict=True)}
    structured = (
        dict(zip(names, new_inputs, strict=True)) if isinstance(source.input, dict) else None
    )
    copies: list[tuple[Any, Any]] = []
    originals: dict[int, Any] = {}

    def clone_function(layer: Any) -> Any:
        if is_lookup(layer):
            new = replace_lookup(layer)
            originals[id(new)] = layer
            return new
        if not copy_layers or not getattr(layer, "weights", None):  # ops have no weights
            return layer
        try:
            new = layer.__class__.from_config(layer.get_config())
        except Exception as e:
            raise ConfigError(
                f"layer {layer.name!r} ({type(layer).__name__}) cannot be re-created from its "
                f"config: {e}"
            ) from e
        copies.append((layer, new))
        return new

    calls: list[LookupCall] = []

    def call_function(layer: Any, *args: Any, **kwargs: Any) -> Any:
        out = layer(*args, **kwargs)
        if id(layer) in originals:
            ids = args[0] if args else next(iter(kwargs.values()))
            calls.append(LookupCall(originals[id(layer)], layer, ids, out, input_of.get(id(ids))))
        return out

    cloned = keras.models.clone_model(
        source,
        input_tensors=structured if structured is not None else _as_struct(source, new_inputs),
        clone_function=clone_function,
        call_function=call_function,
    )
    for old, new in copies:
        new.set_weights(old.get_weights())
    return cloned, calls


def _as_struct(source: keras.Model, new_inputs: list[Any]) -> Any:
    struct = source.input
    if isinstance(struct, (list, tuple)):
        return type(struct)(new_inputs)
    return new_inputs[0]
