"""The external placement's manifest and its dataflow: keys step -> lookups through the
parameter server -> dense part. `keras_hps.servable` runs it; this module reads it.

An external version directory holds a SavedModel and `keras_hps_manifest.json`. The manifest
describes a dataflow over named tensors; every name lives in one namespace made of the
public inputs (the trained model's inputs), the keys step's outputs and the lookups' vectors.

Format 2 (written when the graph computes keys from the inputs)::

    {
      "format": "keras-hps-external", "format_version": 2,
      "model_name": "dlrm",
      "hps_config": "hps.json",
      "tables": [{"model": "dlrm", "table_id": 0, "sha256": "..."}],
      "keys_step": {"signature": "keras_hps_keys"},
      "lookups": [
        {"keys": "hps_keys_0", "feeds": "hps_lookup_0", "model": "dlrm", "table_id": 0,
         "combiner": null}
      ],
      "dense": {"signature": "serving_default"}
    }

- The SavedModel signature `keys_step.signature` takes exactly the public inputs (its
  SignatureDef's inputs *are* the public signature's inputs, raw strings included) and
  returns named int tensors: the keys of the lookups and any tensor that the dense part
  reads too (computed once, passed through).
- Each lookup reads its keys from the tensor named `keys` (a keys-step output or a public
  input), looks them up in table `table_id` of `model`, and names the vectors `feeds`. With
  a `combiner` (`sum`, `mean`, `sqrtn`) and keys of rank 2 or more, the last axis is a bag
  padded with -1, pooled into one vector.
- The SavedModel signature `dense.signature` takes any of those names and returns the
  public outputs. The public signature (name `dense.signature`) has the keys step's inputs
  and the dense part's outputs; the keys-step signature is not public.

`hps_config` is the parameter-server config the lookups read, relative to the version
directory: the version's own copy, naming this version's table files (exports from before
version pinning name the repository's `../../hps.json`). `tables` gives each table's content
digest, so versions whose tables are equal share one loaded copy in the server.

Format 1 (no keys step: every lookup reads a public input) has per lookup `"input"` (the
public key input, which is its `keys`), `"dtype"` and `"shape"` of that input, and the dense
part is `serving_default`; its public signature is the dense part's with each `feeds` input
replaced by its key input.

Requests of any batch size are accepted: a lookup with more keys than the table's
`max_batch_size x maxnum_catfeature_query_per_table_per_sample` goes to the parameter server
in pieces of at most that many keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from keras_hps.errors import ConfigError, InvalidInputError

MANIFEST_NAME = "keras_hps_manifest.json"
MANIFEST_FORMAT = "keras-hps-external"
FORMAT_VERSIONS = (1, 2)
COMBINERS = ("sum", "mean", "sqrtn")
VERSION_HPS_CONFIG = "hps.json"  # an external version's own parameter-server config


@dataclass(frozen=True)
class Lookup:
    """One lookup of the dataflow: tensor `keys` -> (model, table id) -> tensor `feeds`."""

    keys: str
    feeds: str
    model: str
    table_id: int
    combiner: str | None = None


@dataclass(frozen=True)
class Dataflow:
    """A parsed manifest: the keys-step and dense signature names and the lookups."""

    format_version: int
    keys_signature: str | None
    dense_signature: str
    lookups: tuple[Lookup, ...]
    key_inputs: dict[str, tuple[str, list[int | None] | None]]  # format 1: input -> dtype, shape
    hps_config: str | None
    digests: dict[tuple[str, int], str]  # (model, table id) -> "sha256:<hex>" of its content


def parse_manifest(manifest: Any, path: str) -> Dataflow:
    """Check a manifest (as read from JSON) and return its dataflow; ConfigError names the
    file and the field."""
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{path}: 'format' must be {MANIFEST_FORMAT!r}")
    version = manifest.get("format_version")
    if version not in FORMAT_VERSIONS:
        raise ConfigError(f"{path}: unsupported format_version {version!r} (this keras-hps "
                          f"reads {', '.join(map(str, FORMAT_VERSIONS))})")
    entries = manifest.get("lookups")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: 'lookups' must be a non-empty list")
    lookups, key_inputs = [], {}
    for i, entry in enumerate(entries):
        try:
            keys = str(entry["input"] if version == 1 else entry["keys"])
            lookup = Lookup(keys, str(entry["feeds"]), str(entry["model"]),
                            int(entry["table_id"]), entry.get("combiner"))
            if version == 1:
                key_inputs[keys] = (str(entry.get("dtype", "int64")), entry.get("shape"))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: lookups[{i}] is malformed: {e!r}") from e
        if lookup.combiner not in (None, *COMBINERS):
            raise ConfigError(f"{path}: lookups[{i}].combiner {lookup.combiner!r} is not one of "
                              f"{COMBINERS}")
        lookups.append(lookup)
    keys_signature, dense_signature = None, "serving_default"
    if version == 2:
        try:
            keys_signature = str(manifest["keys_step"]["signature"])
            dense_signature = str(manifest["dense"]["signature"])
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{path}: format 2 needs 'keys_step' and 'dense', each with a "
                              f"'signature': {e!r}") from e
    digests = {}
    for i, entry in enumerate(manifest.get("tables") or ()):
        try:
            digests[(str(entry["model"]), int(entry["table_id"]))] = "sha256:" + str(
                entry["sha256"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: tables[{i}] is malformed: {e!r}") from e
    return Dataflow(version, keys_signature, dense_signature, tuple(lookups), key_inputs,
                    manifest.get("hps_config"), digests)


def read_dataflow(version_dir: str) -> Dataflow | None:
    """The version's dataflow, or None for a plain SavedModel (no manifest)."""
    path = os.path.join(version_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        return None
    try:
        manifest = json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the keras-hps manifest: {e}") from e
    return parse_manifest(manifest, path)


def public_signature_defs(flow: Dataflow, defs: dict[str, Any]) -> dict[str, Any]:
    """The SignatureDefs a client sees, by name, from the SavedModel's (`defs`).

    Format 2: one signature, `flow.dense_signature`, with the keys step's inputs (the trained
    model's) and the dense part's outputs; the keys-step signature is not public. Format 1:
    every signature, each `feeds` vector input replaced by its raw key input."""
    if flow.keys_signature is not None:
        public = type(defs[flow.dense_signature])()
        public.CopyFrom(defs[flow.dense_signature])
        public.ClearField("inputs")
        for name, info in defs[flow.keys_signature].inputs.items():
            public.inputs[name].CopyFrom(info)
        return {flow.dense_signature: public}
    out = {}
    for name, dense in defs.items():
        public = type(dense)()
        public.CopyFrom(dense)
        for lookup in flow.lookups:
            if lookup.feeds in dense.inputs:
                del public.inputs[lookup.feeds]
                dtype, shape = flow.key_inputs[lookup.keys]
                public.inputs[lookup.keys].CopyFrom(
                    _tensor_info(f"keras_hps_keys/{lookup.keys}:0", dtype, shape))
        out[name] = public
    return out


def _tensor_info(name: str, dtype: str, shape: list[int | None] | None) -> Any:
    import tensorflow as tf
    from tensorflow.core.protobuf import meta_graph_pb2

    info = meta_graph_pb2.TensorInfo(name=name, dtype=tf.dtypes.as_dtype(dtype).as_datatype_enum)
    if shape is None:
        info.tensor_shape.unknown_rank = True
    else:
        for d in shape:
            info.tensor_shape.dim.add(size=-1 if d is None else d)
    return info


def lookup_in_pieces(ps: Any, model: str, table_id: int, keys: np.ndarray) -> np.ndarray:
    """`ps.lookup` of any number of keys: pieces of at most the table's keys per lookup."""
    spec = ps.table_spec(model, table_id)
    keys = np.asarray(keys).astype(np.int64, copy=False)
    limit = max(1, int(spec.max_keys_per_lookup))
    if keys.size <= limit:
        return np.asarray(ps.lookup(model, table_id, keys), np.float32)
    flat = keys.reshape(-1)
    parts = [np.asarray(ps.lookup(model, table_id, flat[i:i + limit]), np.float32)
             for i in range(0, flat.size, limit)]
    return np.concatenate(parts).reshape(*keys.shape, spec.dim)


def pooled(ps: Any, lookup: Lookup, keys: np.ndarray) -> np.ndarray:
    """The vectors of one lookup: per key, or pooled per bag (last axis, -1 padding skipped;
    an empty bag gives zeros) when the lookup has a combiner and the keys rank 2 or more."""
    if lookup.combiner is None or keys.ndim < 2:
        return lookup_in_pieces(ps, lookup.model, lookup.table_id, keys)
    from keras_hps.combiner import combine

    flat = keys.reshape(-1)
    valid = np.flatnonzero(flat >= 0)
    vectors = lookup_in_pieces(ps, lookup.model, lookup.table_id, flat[valid])
    dim = ps.table_spec(lookup.model, lookup.table_id).dim
    bags = int(np.prod(keys.shape[:-1]))
    total = combine(vectors.reshape(len(valid), dim), valid // max(keys.shape[-1], 1), bags,
                    lookup.combiner)
    return np.asarray(total, np.float32).reshape(*keys.shape[:-1], dim)


#: Runs one SavedModel signature: (name, inputs by alias, output aliases) -> outputs by alias.
SignatureCall = Callable[[str, dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]


class ExternalRunner:
    """Runs one external version's dataflow on validated public inputs: the keys step, the
    lookups through `parameter_server` (in pieces), the dense part.

    `signature_defs` are the SavedModel's SignatureDef protos by name; `call` runs one of them
    (the servable runs them in its session)."""

    def __init__(self, flow: Dataflow, signature_defs: dict[str, Any], call: SignatureCall,
                 parameter_server: Any, where: str = "") -> None:
        self.flow = flow
        self._call = call
        self._ps = parameter_server
        missing = [s for s in (flow.keys_signature, flow.dense_signature)
                   if s is not None and s not in signature_defs]
        if missing:
            raise ConfigError(f"{where}: the manifest names signature(s) {missing}, which the "
                              f"SavedModel lacks (it has {sorted(signature_defs)})")
        self._keys = None if flow.keys_signature is None else signature_defs[flow.keys_signature]
        self._dense_names = [n for n, d in signature_defs.items()
                             if flow.keys_signature is None or n == flow.dense_signature]
        produced = set(self._keys.outputs) if self._keys is not None else set()
        feeds = {lk.feeds for lk in flow.lookups}
        for name in self._dense_names:
            dense = signature_defs[name]
            public = (set(self._keys.inputs) if self._keys is not None
                      else set(flow.key_inputs) | (set(dense.inputs) - feeds))
            unfed = sorted(set(dense.inputs) - public - produced - feeds)
            unknown = sorted({lk.keys for lk in flow.lookups} - public - produced)
            if unfed or unknown:
                raise ConfigError(f"{where}: the manifest leaves input(s) {unfed} of signature "
                                  f"{name!r} unfed and reads keys {unknown} that nothing "
                                  "produces")
        for lk in flow.lookups:
            if not any(lk.feeds in signature_defs[n].inputs for n in self._dense_names):
                raise ConfigError(f"{where}: manifest lookup for input {lk.keys!r} feeds "
                                  f"{lk.feeds!r}, which no signature of the SavedModel takes")
        self._defs = signature_defs
        for lookup in flow.lookups:
            parameter_server.table_spec(lookup.model, lookup.table_id)  # NotFoundError

    def run(self, inputs: dict[str, np.ndarray], signature_name: str,
            output_keys: list[str]) -> dict[str, np.ndarray]:
        """The outputs `output_keys` of public signature `signature_name` for `inputs`."""
        import tensorflow as tf

        env: dict[str, Any] = dict(inputs)
        if self._keys is not None:
            env.update(self._call(self.flow.keys_signature, inputs, list(self._keys.outputs)))
        dense = self._defs[signature_name]
        for lookup in self.flow.lookups:
            if lookup.feeds not in dense.inputs:
                continue
            keys = np.asarray(env[lookup.keys])
            if keys.dtype.kind not in "iu":
                raise InvalidInputError(f"input '{lookup.keys}': keys must be integers, got "
                                        f"{keys.dtype}")
            vectors = pooled(self._ps, lookup, keys)
            want = tf.dtypes.as_dtype(dense.inputs[lookup.feeds].dtype).as_numpy_dtype
            env[lookup.feeds] = vectors if want == np.float32 else vectors.astype(want)
        return self._call(signature_name, {n: env[n] for n in dense.inputs}, output_keys)
