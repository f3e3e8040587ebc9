"""Walking and rewriting the graph of a functional (or Sequential) Keras 3 model.

Every rewrite the exporter does (Embedding -> LookupLayer, LookupLayer -> native TF lookup,
LookupLayer output -> model input) goes through `rewire`, which replays the model's graph
node by node on fresh inputs. Nested functional and Sequential sub-models (towers) are
inlined, a keras-rs `DistributedEmbedding` is expanded into one lookup per feature, and a
layer that holds a table as a direct attribute is copied with the table swapped; every call
of a table lookup is recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
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


def is_distributed_embedding(layer: Any) -> bool:
    """Whether `layer` is a keras-rs `DistributedEmbedding` (checked without importing keras-rs)."""
    return any(c.__name__ == "DistributedEmbedding" and "keras_rs" in c.__module__
               for c in type(layer).__mro__)


def distributed_tables(layer: Any) -> dict[str, Any]:
    """A `DistributedEmbedding`'s table layer of each feature path (`EmbedReduce` layers).

    Only the `default_device` placement (CPU and GPU) keeps its tables as Keras layers; a
    SparseCore placement (TPU) is refused by name.
    """
    placements = set(getattr(layer, "_placement_to_path_to_feature_config", {}))
    if placements - {"default_device"} or not hasattr(layer, "_default_device_embedding_layers"):
        raise ConfigError(
            f"layer {layer.name!r} (DistributedEmbedding) places tables on {sorted(placements)}; "
            "only the 'default_device' placement (CPU/GPU) can be exported"
        )
    return dict(layer._default_device_embedding_layers)


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


@dataclass
class Rewired:
    """A rewritten model, the lookup calls in its graph, and the layers whose own `call`
    reads a table (`holders`: copies with the table swapped, not graph-level lookups)."""

    model: keras.Model
    calls: list[LookupCall]
    holders: dict[str, list[str]] = field(default_factory=dict)  # holder -> its table layers


def _held_tables(layer: Any, is_lookup: Callable[[Any], bool]) -> dict[str, Any]:
    """Table layers `layer` holds as direct attributes, by attribute name. ConfigError for a
    table held deeper (in a container or a sub-layer's sub-layer), which cannot be swapped."""
    direct = {k: v for k, v in vars(layer).items()
              if isinstance(v, keras.layers.Layer) and is_lookup(v)}
    inner = [sub for sub in layer._flatten_layers(include_self=False, recursive=True)
             if is_lookup(sub) and all(sub is not v for v in direct.values())]
    if inner:
        raise ConfigError(
            f"layer {layer.name!r} ({type(layer).__name__}) holds table(s) "
            f"{sorted({s.name for s in inner})} inside a list, dict or sub-layer; the exporter "
            "swaps a table held as a direct attribute of a layer (self.table = Embedding(...)) "
            "or used in the model's graph. Move the table to the model's graph"
        )
    return direct


class _StandIn(keras.layers.Layer):
    """Zeros shaped like a table layer's output: lets Keras build and trace a layer that
    holds a table whose own call cannot run here (a keras_hps lookup needs a parameter
    server)."""

    def __init__(self, table: Any) -> None:
        super().__init__(name=f"{table.name}_stand_in", trainable=False)
        self._spec = table.compute_output_spec

    def call(self, ids: Any, *args: Any, **kwargs: Any) -> Any:
        spec = self._spec(keras.KerasTensor(ids.shape, ids.dtype), *args, **kwargs)
        dynamic = keras.ops.shape(ids)
        shape = [dynamic[i] if d is None else d for i, d in enumerate(spec.shape)]
        return keras.ops.zeros(shape, dtype=spec.dtype)


def _swap(layer: Any, values: dict[str, Any]) -> None:
    """Set `layer.<attr>` to each value, untracking the layers they replace (so their
    weights leave `layer.weights`)."""
    tracker = getattr(layer, "_tracker", None)
    locked = tracker is not None and tracker.locked  # a built layer refuses new sub-layers
    if tracker is not None:
        tracker.unlock()
    try:
        for attr, value in values.items():
            old = getattr(layer, attr, None)
            if tracker is not None and old is not None:
                tracker.untrack(old)
            setattr(layer, attr, value)
    finally:
        if locked:
            tracker.lock()


def _spec_with(layer: Any, stand_ins: dict[str, Any]) -> Callable[..., Any]:
    """A `compute_output_spec` for `layer` that traces its call with the stand-ins."""
    def spec(*args: Any, **kwargs: Any) -> Any:
        current = {attr: getattr(layer, attr) for attr in stand_ins}
        _swap(layer, stand_ins)
        try:
            return type(layer).compute_output_spec(layer, *args, **kwargs)
        finally:
            _swap(layer, current)
    return spec


def _recreate(layer: Any) -> Any:
    try:
        return layer.__class__.from_config(layer.get_config())
    except Exception as e:
        raise ConfigError(
            f"layer {layer.name!r} ({type(layer).__name__}) cannot be re-created from its "
            f"config: {e}"
        ) from e


def rewire(
    model: keras.Model,
    is_lookup: Callable[[Any], bool],
    replace_lookup: Callable[[Any, Any], Any],
    copy_layers: bool,
) -> Rewired:
    """Re-create `model`'s graph with each call of a lookup layer going to
    `replace_lookup(layer, ids)` (called per call; return the same object to share it).

    Other layers are copied (new objects, same weights) when `copy_layers`, else shared; a
    layer holding a lookup layer as an attribute is always copied, with the lookup replaced.
    """
    source = as_functional(model)
    names = input_names(source)
    new_inputs = [
        keras.Input(batch_shape=t.shape, dtype=t.dtype, name=n, sparse=t.sparse, ragged=t.ragged)
        for t, n in zip(source.inputs, names, strict=True)
    ]
    input_of = {id(t): n for t, n in zip(new_inputs, names, strict=True)}
    copies: dict[int, tuple[Any, Any, Any]] = {}  # id(old) -> (old, new, skipped var ids)
    result = Rewired(model=None, calls=[])  # type: ignore[arg-type]

    def lookup(layer: Any, args: tuple, kwargs: dict) -> Any:
        ids = args[0] if args else next(iter(kwargs.values()))
        new = replace_lookup(layer, ids)
        out = new(*args, **kwargs)
        result.calls.append(LookupCall(layer, new, ids, out, input_of.get(id(ids))))
        return out

    def copy_of(layer: Any) -> Any:
        if id(layer) in copies:
            return copies[id(layer)][1]
        if _held_tables(layer, is_lookup):
            new, skipped = _recreate(layer), (set(), set())
        elif copy_layers and getattr(layer, "weights", None):  # ops have no weights
            new, skipped = _recreate(layer), (set(), set())
        else:
            return layer
        copies[id(layer)] = (layer, new, skipped)
        return new

    def call_holder(layer: Any, args: tuple, kwargs: dict) -> Any:
        """A layer whose call() reads a table: its copy is built and traced with stand-ins
        that give the table's output shape, then the tables are swapped for replacements."""
        if id(layer) in copies:
            return copies[id(layer)][1](*args, **kwargs)
        new = copy_of(layer)
        held = _held_tables(layer, is_lookup)
        stand_ins = {attr: _StandIn(sub) for attr, sub in held.items()}
        swapped = {attr: replace_lookup(sub, None) for attr, sub in held.items()}
        _swap(new, stand_ins)
        out = new(*args, **kwargs)  # builds the copy's own layers around the stand-ins
        _swap(new, swapped)
        new.compute_output_spec = _spec_with(new, stand_ins)
        skipped = copies[id(layer)][2]
        skipped[0].update(id(v) for sub in held.values() for v in sub.weights)
        skipped[1].update(id(v) for sub in swapped.values() for v in sub.weights)
        result.holders[layer.name] = [sub.name for sub in held.values()]
        return out

    def call(layer: Any, args: tuple, kwargs: dict) -> Any:
        if is_lookup(layer):
            return lookup(layer, args, kwargs)
        if isinstance(layer, keras.Model) and is_graph_model(layer):
            return inline(layer, args[0] if args else next(iter(kwargs.values())))
        if is_distributed_embedding(layer):
            return expand(layer, args, kwargs)
        if isinstance(layer, keras.layers.Layer):
            if _held_tables(layer, is_lookup):
                return call_holder(layer, args, kwargs)
            layer = copy_of(layer)
        return layer(*args, **kwargs)

    def expand(layer: Any, args: tuple, kwargs: dict) -> Any:
        """A DistributedEmbedding call: each feature's table looked up on its own."""
        tables = distributed_tables(layer)
        if len(args) > 1 or kwargs.get("weights") is not None:
            raise ConfigError(f"layer {layer.name!r} (DistributedEmbedding) is called with "
                              "weights; only unweighted features can be exported")
        inputs = args[0] if args else kwargs["inputs"]
        flat = keras.tree.flatten_with_path(inputs)
        outs = [lookup(tables[".".join(str(p) for p in path)], (x,), {}) for path, x in flat]
        return keras.tree.pack_sequence_as(inputs, outs)

    def inline(sub: keras.Model, inputs: Any) -> Any:
        if isinstance(sub, keras.Sequential):
            x = inputs
            for layer in sub.layers:
                x = call(layer, (x,), {})
            return x
        return run(sub, list(sub._standardize_inputs(inputs)))

    def run(graph: keras.Model, inputs: list[Any]) -> Any:
        tensors = {id(x): y for x, y in zip(graph.inputs, inputs, strict=True)}
        for depth in sorted(graph._nodes_by_depth, reverse=True):
            for node in graph._nodes_by_depth[depth]:
                if not node.operation or node.is_input:
                    continue
                if any(id(x) not in tensors for x in node.input_tensors):
                    continue
                args, kwargs = node.arguments.fill_in(tensors)
                kwargs.pop("training", None)
                outputs = call(node.operation, args, kwargs)
                for x, y in zip(node.outputs, keras.tree.flatten(outputs), strict=True):
                    tensors[id(x)] = y
        flat = [tensors[id(x)] for x in graph.outputs]
        return keras.tree.pack_sequence_as(graph._outputs_struct, flat)

    outputs = run(source, new_inputs)
    struct = source._inputs_struct
    if isinstance(struct, dict):
        model_inputs: Any = dict(zip(names, new_inputs, strict=True))
    else:
        model_inputs = keras.tree.pack_sequence_as(struct, new_inputs)
    result.model = keras.Model(model_inputs, outputs, name=source.name)
    for old, new, skipped in copies.values():
        _copy_weights(old, new, skipped)
    return result


def _copy_weights(old: Any, new: Any, skipped: tuple[set[int], set[int]]) -> None:
    """Copy `old`'s weights into its re-created `new`, leaving out the swapped tables (ids of
    the original's table variables, ids of the swapped-in lookups' variables)."""
    src = [v for v in old.weights if id(v) not in skipped[0]]
    dst = [v for v in new.weights if id(v) not in skipped[1]]
    shapes = [tuple(v.shape) for v in src], [tuple(v.shape) for v in dst]
    if shapes[0] != shapes[1]:
        raise ConfigError(
            f"layer {old.name!r} ({type(old).__name__}): its copy has weights "
            f"{shapes[1]}, the original {shapes[0]}"
        )
    for a, b in zip(src, dst, strict=True):
        b.assign(a)
