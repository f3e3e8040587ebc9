"""The external placement's split of an inference graph into a keys step and a dense part.

The keys step is the part of the graph between the model's inputs and the ids of each
lookup (slicing, casts, `Hashing`, `IntegerLookup`, `StringLookup`, custom preprocessing);
the dense part is the rest, fed the looked-up vectors. A tensor the keys step computes and
the dense part also reads (hashed ids used as a feature, say) is an output of the keys step
and an input of the dense part, so it is computed once. The server runs: keys step ->
lookups through the parameter server -> dense part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras

from keras_hps.errors import ConfigError
from keras_hps.export.graph import LookupCall, Rewired, input_names

KEYS_PREFIX = "hps_keys_"
VECTORS_PREFIX = "hps_lookup_"


@dataclass
class Split:
    """The two graphs of an external export and how tensors flow between them.

    Names form one namespace: the public inputs, the keys step's outputs (`hps_keys_<j>`)
    and the lookups' vectors (`hps_lookup_<i>`).
    """

    keys_step: keras.Model | None  # public inputs -> keys_outputs; None: keys are inputs
    keys_inputs: list[str]  # public inputs the keys step reads, in keys_step.inputs order
    keys_outputs: list[str]  # names of keys_step.outputs, in order
    lookups: list[tuple[LookupCall, str, str]]  # (call, name of its keys, name of its vectors)
    dense: keras.Model  # dense_inputs -> the model's outputs
    dense_inputs: list[str]  # names of dense.inputs, in order


def _producer(tensor: Any) -> Any:
    """The node that produced a KerasTensor."""
    history = tensor._keras_history
    return history.operation._inbound_nodes[history.node_index]


def _ancestors(targets: Sequence[Any], stops: dict[int, str], where: str) -> dict[int, Any]:
    """Every tensor the `targets` are computed from, by id (targets included), walking back
    to the model inputs. Reaching a lookup's output (`stops`) is an error: keys that depend on
    another lookup's vectors cannot be resolved in one step."""
    seen: dict[int, Any] = {}
    todo = list(targets)
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        if id(t) in stops:
            raise ConfigError(
                f"the keys of {where} are computed from the vectors of {stops[id(t)]!r}; the "
                "external placement resolves all keys before any lookup. Export with "
                "tables='embedded'"
            )
        seen[id(t)] = t
        node = _producer(t)
        if not node.is_input:
            todo.extend(node.input_tensors)
    return seen


def split_for_external(rewired: Rewired) -> Split:
    """Cut an inference graph (lookups as keras_hps lookup layers) at its lookups."""
    if rewired.holders:
        holder, tables = next(iter(rewired.holders.items()))
        raise ConfigError(
            f"layer {holder!r} reads table(s) {tables} inside its own call(); the external "
            "placement cuts the graph at each lookup, which must be a layer of the model's "
            "graph. Export with tables='embedded', or call the table layer in the graph"
        )
    model, calls = rewired.model, rewired.calls
    names = input_names(model)
    input_of = {id(t): n for t, n in zip(model.inputs, names, strict=True)}
    outputs_of = {id(c.output): c.layer.name for c in calls}
    region: dict[int, Any] = {}  # tensors of the keys step
    for call in calls:
        region.update(_ancestors([call.ids], outputs_of, f"lookup {call.layer.name!r}"))

    keys_out: dict[int, tuple[str, Any]] = {}  # id -> (name, tensor), keys step outputs

    def keys_name(t: Any) -> str:
        if id(t) in input_of:
            return input_of[id(t)]
        if id(t) not in keys_out:
            keys_out[id(t)] = (f"{KEYS_PREFIX}{len(keys_out)}", t)
        return keys_out[id(t)][0]

    lookups = [(c, keys_name(c.ids), f"{VECTORS_PREFIX}{i}") for i, c in enumerate(calls)]
    vectors_of = {id(c.output): name for c, _, name in lookups}
    # Walk back from the outputs: the dense part starts at lookup outputs, public inputs and
    # tensors the keys step computes.
    dense_in: dict[int, tuple[str, Any]] = {}
    seen: set[int] = set()
    todo = list(model.outputs)
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if id(t) in vectors_of:
            dense_in[id(t)] = (vectors_of[id(t)], t)
        elif id(t) in input_of or id(t) in region:
            dense_in[id(t)] = (keys_name(t), t)
        else:
            todo.extend(_producer(t).input_tensors)
    clash = sorted(set(names) & ({n for _, n, _ in [(0, *k) for k in keys_out.values()]}
                                 | set(vectors_of.values())))
    if clash:
        raise ConfigError(f"model input(s) {clash} use a name the external placement gives to "
                          "its own tensors; rename the input(s)")
    order = sorted(dense_in.values(), key=lambda item: _dense_order(item[0], names))
    dense = keras.Model([t for _, t in order], model.outputs, name=f"{model.name}_dense")
    keys_step, keys_inputs = None, []
    if keys_out:
        used = [(n, t) for n, t in zip(names, model.inputs, strict=True)
                if id(t) in region]
        keys_inputs = [n for n, _ in used]
        keys_step = keras.Model([t for _, t in used], [t for _, t in keys_out.values()],
                                name=f"{model.name}_keys")
    return Split(keys_step, keys_inputs, [n for n, _ in keys_out.values()], lookups, dense,
                 [n for n, _ in order])


def _dense_order(name: str, public: list[str]) -> tuple[int, int, str]:
    """Public inputs first (in model order), then keys-step outputs, then vectors."""
    if name in public:
        return (0, public.index(name), name)
    prefix = 1 if name.startswith(KEYS_PREFIX) else 2
    return (prefix, int(name.rsplit("_", 1)[1]), name)
