"""Run one exported model version: a plain SavedModel or a keras-hps external-placement export.

`load_servable(version_dir)` is the single way the model server (and tests, and users)
load a version directory. A directory without a keras-hps manifest is served as is, the
way TensorFlow Serving would serve it. A directory with `keras_hps_manifest.json` holds the
dense part of a model as a SavedModel whose embedding inputs are vectors; the servable
resolves the raw key inputs through the parameter server and feeds the vectors in, so
its public signature still takes raw keys.

Manifest (`keras_hps_manifest.json`, written by `keras_hps.export`)::

    {
      "format": "keras-hps-external", "format_version": 1,
      "model_name": "dlrm",
      "hps_config": "../../hps.json",          # relative to the version directory
      "lookups": [
        {"input": "user_id", "feeds": "user_id__hps_vectors", "model": "dlrm",
         "table_id": 0, "dtype": "int64", "shape": [null, 1], "combiner": null}
      ]
    }

`input` is the public key input, `feeds` the dense SavedModel's vector input it resolves
to, `shape` the key input's shape (`null` = any size). With a `combiner` (`sum`, `mean`,
`sqrtn`) the keys are a `[batch, n]` array padded with -1 and the vectors of each row are
combined into one `[batch, dim]` vector, as `SparseLookupLayer` does.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from keras_hps.errors import ConfigError, InvalidInputError, NotFoundError

MANIFEST_NAME = "keras_hps_manifest.json"
MANIFEST_FORMAT = "keras-hps-external"
MANIFEST_VERSION = 1
COMBINERS = ("sum", "mean", "sqrtn")
INIT_OP_SIGNATURE_KEY = "__saved_model_init_op"


@dataclass(frozen=True)
class TensorSpec:
    """One named signature tensor: NumPy dtype and shape (`None` for an unknown size)."""

    dtype: np.dtype
    shape: tuple[int | None, ...] | None  # None: unknown rank

    def describe(self) -> str:
        """The shape written the way TensorFlow prints it, e.g. `[?,3]`."""
        if self.shape is None:
            return "<unknown>"
        return "[" + ",".join("?" if d is None else str(d) for d in self.shape) + "]"

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        """Whether an array of `shape` fits this spec."""
        if self.shape is None:
            return True
        if len(shape) != len(self.shape):
            return False
        return all(want is None or want == got for want, got in zip(self.shape, shape, strict=True))


@dataclass(frozen=True)
class SignatureSpec:
    """A signature's inputs and outputs by tensor alias, and its method name."""

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    method_name: str


@dataclass(frozen=True)
class TableLookup:
    """One manifest entry: key input -> (model, table id) -> dense-part vector input."""

    input: str
    feeds: str
    model: str
    table_id: int
    key_spec: TensorSpec
    combiner: str | None = None


def _spec_from_tensor_info(info: Any) -> TensorSpec:
    import tensorflow as tf

    dtype = np.dtype(tf.dtypes.as_dtype(info.dtype).as_numpy_dtype)
    if info.tensor_shape.unknown_rank:
        return TensorSpec(dtype, None)
    shape = tuple(None if d.size < 0 else int(d.size) for d in info.tensor_shape.dim)
    return TensorSpec(dtype, shape)


def _tensor_info(name: str, spec: TensorSpec) -> Any:
    import tensorflow as tf
    from tensorflow.core.protobuf import meta_graph_pb2

    dtype = tf.dtypes.as_dtype(spec.dtype).as_datatype_enum
    info = meta_graph_pb2.TensorInfo(name=name, dtype=dtype)
    if spec.shape is None:
        info.tensor_shape.unknown_rank = True
    else:
        for d in spec.shape:
            info.tensor_shape.dim.add(size=-1 if d is None else d)
    return info


def _read_signature_defs(version_dir: str) -> dict[str, Any]:
    from tensorflow.core.protobuf import saved_model_pb2

    path = os.path.join(version_dir, "saved_model.pb")
    saved = saved_model_pb2.SavedModel()
    with open(path, "rb") as f:
        saved.ParseFromString(f.read())
    for meta_graph in saved.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            # The init-op entry is SavedModel bookkeeping, not a signature clients can call.
            return {
                k: v for k, v in meta_graph.signature_def.items() if k != INIT_OP_SIGNATURE_KEY
            }
    raise NotFoundError(f"{path}: no MetaGraph tagged 'serve' (TF Serving loads only that tag)")


def _spec_from_signature_def(sig: Any) -> SignatureSpec:
    return SignatureSpec(
        inputs={k: _spec_from_tensor_info(v) for k, v in sig.inputs.items()},
        outputs={k: _spec_from_tensor_info(v) for k, v in sig.outputs.items()},
        method_name=sig.method_name,
    )


def read_manifest(version_dir: str) -> dict[str, Any] | None:
    """The version's keras-hps manifest as a dict, or None for a plain SavedModel."""
    path = os.path.join(version_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the keras-hps manifest: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{path}: 'format' must be {MANIFEST_FORMAT!r}")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise ConfigError(
            f"{path}: unsupported format_version {manifest.get('format_version')!r} "
            f"(this keras-hps reads {MANIFEST_VERSION})"
        )
    if not isinstance(manifest.get("lookups"), list) or not manifest["lookups"]:
        raise ConfigError(f"{path}: 'lookups' must be a non-empty list")
    return manifest


def _parse_lookups(manifest: dict[str, Any], path: str) -> list[TableLookup]:
    lookups = []
    for i, entry in enumerate(manifest["lookups"]):
        try:
            shape = entry["shape"]
            lookups.append(
                TableLookup(
                    input=str(entry["input"]),
                    feeds=str(entry["feeds"]),
                    model=str(entry["model"]),
                    table_id=int(entry["table_id"]),
                    key_spec=TensorSpec(
                        np.dtype(entry.get("dtype", "int64")),
                        None if shape is None else tuple(shape),
                    ),
                    combiner=entry.get("combiner"),
                )
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: lookups[{i}] is malformed: {e!r}") from e
        if lookups[-1].combiner not in (None, *COMBINERS):
            raise ConfigError(
                f"{path}: lookups[{i}].combiner {lookups[-1].combiner!r} is not one of {COMBINERS}"
            )
        if lookups[-1].key_spec.dtype.kind not in "iu":
            raise ConfigError(f"{path}: lookups[{i}] key dtype must be an integer type")
    return lookups


def _public_signature_def(dense_def: Any, lookups: list[TableLookup]) -> Any:
    """The signature a client sees: vector inputs replaced by their raw key inputs."""
    if not lookups:
        return dense_def
    public = type(dense_def)()
    public.CopyFrom(dense_def)
    for lookup in lookups:
        if lookup.feeds in public.inputs:
            del public.inputs[lookup.feeds]
    for lookup in lookups:
        if lookup.feeds in dense_def.inputs:
            info = _tensor_info(f"keras_hps_keys/{lookup.input}:0", lookup.key_spec)
            public.inputs[lookup.input].CopyFrom(info)
    return public


def describe_version(version_dir: str | os.PathLike) -> tuple[str, dict[str, SignatureSpec]]:
    """A version's placement ("embedded" | "external") and public signatures, read from its
    files without loading the graph."""
    version_dir = os.fspath(version_dir)
    manifest = read_manifest(version_dir)
    lookups = [] if manifest is None else _parse_lookups(manifest, version_dir)
    defs = _read_signature_defs(version_dir)
    public = {k: _public_signature_def(v, lookups) for k, v in defs.items()}
    specs = {k: _spec_from_signature_def(v) for k, v in public.items()}
    return ("external" if lookups else "embedded"), specs


def _combine(vectors: np.ndarray, mask: np.ndarray, combiner: str) -> np.ndarray:
    """Combine `[batch, n, dim]` vectors over the valid (`mask`) entries of each row."""
    vectors = vectors * mask[..., None]
    total = vectors.sum(axis=1)
    if combiner == "sum":
        return total
    count = mask.sum(axis=1, dtype=np.float32)[:, None]
    scale = count if combiner == "mean" else np.sqrt(count)
    return np.divide(total, scale, out=np.zeros_like(total), where=scale > 0)


class Servable:
    """A loaded model version: signatures, validated thread-safe `run`, and `close`."""

    def __init__(
        self,
        path: str,
        loaded: Any,
        signature_defs: dict[str, Any],
        lookups: list[TableLookup] | None = None,
        parameter_server: Any = None,
    ) -> None:
        self.path = path
        self.name = os.path.basename(os.path.dirname(path))
        base = os.path.basename(path)
        self.version: int | None = int(base) if base.isdigit() else None
        self.placement = "external" if lookups else "embedded"
        self._loaded = loaded
        self._lookups = lookups or []
        self._ps = parameter_server
        self._dense_defs = signature_defs
        self._signature_defs = {
            k: _public_signature_def(v, self._lookups) for k, v in signature_defs.items()
        }
        self.signatures: dict[str, SignatureSpec] = {
            k: _spec_from_signature_def(v) for k, v in self._signature_defs.items()
        }
        self._functions = {k: loaded.signatures[k] for k in signature_defs}
        self._closed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"Servable(name={self.name!r}, version={self.version}, placement={self.placement!r}, "
            f"signatures={sorted(self.signatures)})"
        )

    def signature_def(self, signature_name: str = "serving_default") -> Any:
        """The public `SignatureDef` proto (what GetModelMetadata reports)."""
        self._check_signature(signature_name)
        return self._signature_defs[signature_name]

    def _check_signature(self, signature_name: str) -> SignatureSpec:
        spec = self.signatures.get(signature_name)
        if spec is None:
            raise NotFoundError(
                f'Serving signature key "{signature_name}" not found. '
                f"Model {self.name!r} version {self.version} has: {sorted(self.signatures)}"
            )
        return spec

    def validate(self, inputs: dict[str, np.ndarray], signature_name: str) -> dict[str, np.ndarray]:
        """Check names, dtypes and shapes against the signature; returns the inputs as arrays."""
        spec = self._check_signature(signature_name)
        sent, wanted = set(inputs), set(spec.inputs)
        if sent != wanted:
            raise InvalidInputError(
                f"input size does not match signature: {len(sent)}!={len(wanted)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(wanted))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - wanted))}}}. "
                f"Missing but required: {{{','.join(sorted(wanted - sent))}}}."
            )
        arrays = {}
        for name, tensor_spec in spec.inputs.items():
            array = np.asarray(inputs[name])
            if tensor_spec.dtype == object and array.dtype.kind in "SUO":
                array = array.astype(object)  # DT_STRING: bytes or str elements
            elif array.dtype != tensor_spec.dtype:
                raise InvalidInputError(
                    f"input '{name}': expects dtype {tensor_spec.dtype.name} but "
                    f"{array.dtype.name} was provided"
                )
            if not tensor_spec.accepts_shape(array.shape):
                raise InvalidInputError(
                    f"input '{name}': shape [{','.join(map(str, array.shape))}] is not "
                    f"compatible with the signature's {tensor_spec.describe()}"
                )
            arrays[name] = array
        return arrays

    def run(
        self,
        inputs: dict[str, np.ndarray],
        signature_name: str = "serving_default",
        output_keys: list[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Validate `inputs`, run the signature, return the outputs (all, or `output_keys`)."""
        spec = self._check_signature(signature_name)
        with self._lock:
            if self._closed:
                raise NotFoundError(f"model {self.name!r} version {self.version} was unloaded")
            function = self._functions[signature_name]
        if output_keys is not None:
            unknown = [k for k in output_keys if k not in spec.outputs]
            if unknown or len(set(output_keys)) != len(output_keys):
                bad = unknown[0] if unknown else "(duplicate)"
                raise InvalidInputError(
                    f"output tensor alias not found in signature: {bad}. Outputs expected to "
                    f"be in the set {{{','.join(sorted(spec.outputs))}}}."
                )
        arrays = self.validate(inputs, signature_name)
        feeds = self._dense_feeds(arrays, self._dense_defs[signature_name])
        outputs = function(**feeds)
        keys = list(spec.outputs) if output_keys is None else output_keys
        return {k: outputs[k].numpy() for k in keys}

    def _dense_feeds(self, arrays: dict[str, np.ndarray], dense_def: Any) -> dict[str, Any]:
        """What the SavedModel's signature takes: key inputs resolved to vectors, the rest as is."""
        import tensorflow as tf

        feeds: dict[str, Any] = {}
        for lookup in self._lookups:
            if lookup.feeds in dense_def.inputs:
                vectors = self._lookup_vectors(lookup, arrays[lookup.input])
                feeds[lookup.feeds] = tf.convert_to_tensor(vectors)
        for name, array in arrays.items():
            if name in dense_def.inputs:
                feeds[name] = tf.convert_to_tensor(array)
        return feeds

    def _lookup_vectors(self, lookup: TableLookup, keys: np.ndarray) -> np.ndarray:
        """Vectors of one key input from the parameter server (combined per row if asked)."""
        if lookup.combiner is None:
            vectors = self._ps.lookup(lookup.model, lookup.table_id, keys.astype(np.int64))
            return np.asarray(vectors, np.float32)
        if keys.ndim != 2:
            raise InvalidInputError(
                f"input '{lookup.input}': a combined lookup takes [batch, n] keys "
                f"padded with -1, got shape {list(keys.shape)}"
            )
        mask = keys >= 0
        found = np.asarray(
            self._ps.lookup(lookup.model, lookup.table_id, keys[mask].astype(np.int64)),
            np.float32,
        )
        dim = self._ps.table_spec(lookup.model, lookup.table_id).dim
        per_key = np.zeros(keys.shape + (dim,), np.float32)
        per_key[mask] = found.reshape(-1, dim)
        return _combine(per_key, mask, lookup.combiner)

    def close(self) -> None:
        """Release the loaded graph; later `run` calls raise NotFoundError."""
        with self._lock:
            self._closed = True
            self._functions = {}
            self._loaded = None


def _resolve_parameter_server(manifest: dict[str, Any], version_dir: str, given: Any) -> Any:
    if given is not None:
        return given
    from keras_hps import parameter_server as ps_module

    try:
        return ps_module.get_parameter_server()
    except RuntimeError:
        pass
    rel = manifest.get("hps_config")
    if not rel:
        raise ConfigError(
            f"{os.path.join(version_dir, MANIFEST_NAME)}: no 'hps_config' and no parameter "
            "server initialised; call keras_hps.init(...) or pass parameter_server="
        )
    path = os.path.normpath(os.path.join(version_dir, rel))
    if not os.path.exists(path):
        raise ConfigError(f"{version_dir}: the manifest's hps_config {path} does not exist")
    return ps_module.init(path)


def load_servable(version_dir: str | os.PathLike, parameter_server: Any = None) -> Servable:
    """Load `<base_path>/<version>/` for serving.

    A plain SavedModel is served as is. An external-placement export (with a keras-hps
    manifest) resolves its key inputs through `parameter_server`, else the one already
    initialised, else one initialised from the manifest's `hps_config`.
    """
    version_dir = os.path.abspath(os.fspath(version_dir))
    if not os.path.isfile(os.path.join(version_dir, "saved_model.pb")):
        raise NotFoundError(f"{version_dir}: not a SavedModel directory (no saved_model.pb)")
    import tensorflow as tf

    manifest = read_manifest(version_dir)
    signature_defs = _read_signature_defs(version_dir)
    loaded = tf.saved_model.load(version_dir, tags=["serve"])
    if manifest is None:
        return Servable(version_dir, loaded, signature_defs)
    lookups = _parse_lookups(manifest, os.path.join(version_dir, MANIFEST_NAME))
    for lookup in lookups:
        if not any(lookup.feeds in sig.inputs for sig in signature_defs.values()):
            raise ConfigError(
                f"{version_dir}: manifest lookup for input {lookup.input!r} feeds "
                f"{lookup.feeds!r}, which no signature of the SavedModel takes"
            )
    ps = _resolve_parameter_server(manifest, version_dir, parameter_server)
    for lookup in lookups:
        ps.table_spec(lookup.model, lookup.table_id)  # NotFoundError names an unknown table
    return Servable(version_dir, loaded, signature_defs, lookups, ps)
