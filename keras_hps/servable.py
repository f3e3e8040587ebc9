"""Run one exported model version: a plain SavedModel or a keras-hps external-placement export.

`load_servable(version_dir)` is the single way the model server (and tests, and users)
load a version directory. Every version is loaded the way TensorFlow Serving loads it: the
MetaGraph of the requested tags is imported into a graph of its own and run in a session,
so TF1 graph SavedModels and TF2 SavedModels (`tf.saved_model.save`, Keras `model.export`)
are served alike, and a request is checked only where TF Serving checks it (an input of
shape `[3]` for a signature that declares `[?,1]` is computed, as there).

A directory without a keras-hps manifest is served as is. A directory with
`keras_hps_manifest.json` holds the dense part of a model as a SavedModel whose embedding
inputs are vectors; the servable resolves the raw key inputs through a parameter server and
feeds the vectors in, so its public signature still takes raw keys.

Manifest (`keras_hps_manifest.json`, written by `keras_hps.export`)::

    {
      "format": "keras-hps-external", "format_version": 1,
      "model_name": "dlrm",
      "hps_config": "hps.json",                # relative to the version directory
      "tables": [{"model": "dlrm", "table_id": 0, "sha256": "..."}],
      "lookups": [
        {"input": "user_id", "feeds": "user_id__hps_vectors", "model": "dlrm",
         "table_id": 0, "dtype": "int64", "shape": [null, 1], "combiner": null}
      ]
    }

`hps_config` is the parameter-server config this version's lookups read: since version
pinning, a copy inside the version directory naming this version's own table files (older
exports name the repository's `hps.json`, shared by every version). `tables` gives the
content digest of each table, so that two versions whose tables are equal share one loaded
copy (`version_tables`). `input` is the public key input, `feeds` the dense SavedModel's
vector input it resolves to, `shape` the key input's shape (`null` = any size). With a
`combiner` (`sum`, `mean`, `sqrtn`) the keys are a `[batch, n]` array padded with -1 and the
vectors of each row are combined into one `[batch, dim]` vector, as `SparseLookupLayer` does.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from keras_hps.errors import ConfigError, InvalidInputError, NotFoundError

MANIFEST_NAME = "keras_hps_manifest.json"
MANIFEST_FORMAT = "keras-hps-external"
MANIFEST_VERSION = 1
VERSION_HPS_CONFIG = "hps.json"  # an external version's own parameter-server config
COMBINERS = ("sum", "mean", "sqrtn")
INIT_OP_SIGNATURE_KEY = "__saved_model_init_op"
SERVE_TAGS = ("serve",)
# Callables kept per servable: one per (signature, output selection) used.
_MAX_CALLABLES = 256


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


def _meta_graph_not_found(tags: tuple[str, ...]) -> NotFoundError:
    """TF Serving's error for a SavedModel without a MetaGraph of the requested tags."""
    return NotFoundError(
        f"Could not find meta graph def matching supplied tags: {{ {' '.join(tags)} }}. To "
        "inspect available tag-sets in the SavedModel, please use the SavedModel CLI: "
        "`saved_model_cli`"
    )


def _read_signature_defs(version_dir: str, tags: tuple[str, ...] = SERVE_TAGS) -> dict[str, Any]:
    from tensorflow.core.protobuf import saved_model_pb2

    path = os.path.join(version_dir, "saved_model.pb")
    saved = saved_model_pb2.SavedModel()
    with open(path, "rb") as f:
        saved.ParseFromString(f.read())
    for meta_graph in saved.meta_graphs:
        if set(meta_graph.meta_info_def.tags) == set(tags):
            return _callable_signatures(meta_graph)
    raise _meta_graph_not_found(tags)


def _callable_signatures(meta_graph: Any) -> dict[str, Any]:
    """The signatures clients can call (the init-op entry is SavedModel bookkeeping)."""
    return {k: v for k, v in meta_graph.signature_def.items() if k != INIT_OP_SIGNATURE_KEY}


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


def describe_version(
    version_dir: str | os.PathLike, tags: tuple[str, ...] = SERVE_TAGS
) -> tuple[str, dict[str, SignatureSpec]]:
    """A version's placement ("embedded" | "external") and public signatures, read from its
    files without loading the graph."""
    version_dir = os.fspath(version_dir)
    manifest = read_manifest(version_dir)
    lookups = [] if manifest is None else _parse_lookups(manifest, version_dir)
    defs = _read_signature_defs(version_dir, tags)
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
        session: Any,
        signature_defs: dict[str, Any],
        lookups: list[TableLookup] | None = None,
        parameter_server: Any = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.name = os.path.basename(os.path.dirname(path))
        base = os.path.basename(path)
        self.version: int | None = int(base) if base.isdigit() else None
        self.placement = "external" if lookups else "embedded"
        self._session = session
        self._lookups = lookups or []
        self._ps = parameter_server
        self._on_close = on_close
        self._dense_defs = signature_defs
        self._signature_defs = {
            k: _public_signature_def(v, self._lookups) for k, v in signature_defs.items()
        }
        self.signatures: dict[str, SignatureSpec] = {
            k: _spec_from_signature_def(v) for k, v in self._signature_defs.items()
        }
        self._callables: dict[tuple, Any] = {}
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
        """Check input names and dtypes against the signature; returns the inputs as arrays.

        Shapes are not checked here: as in TF Serving, the graph decides (see `run`)."""
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
            arrays[name] = array
        return arrays

    def _check_open(self) -> None:
        if self._closed:
            raise NotFoundError(f"model {self.name!r} version {self.version} was unloaded")

    def _check_output_keys(self, spec: SignatureSpec, output_keys: list[str]) -> None:
        seen: set[str] = set()
        for key in output_keys:
            if key not in spec.outputs:
                raise InvalidInputError(
                    f"output tensor alias not found in signature: {key}. Outputs expected to "
                    f"be in the set {{{','.join(sorted(spec.outputs))}}}."
                )
            if key in seen:
                raise InvalidInputError(f"duplicate output tensor alias: {key}")
            seen.add(key)

    def run(
        self,
        inputs: dict[str, np.ndarray],
        signature_name: str = "serving_default",
        output_keys: list[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Validate `inputs`, run the signature, return the outputs (all, or `output_keys`).

        An input whose shape differs from the signature's is computed when the graph can
        compute it; when the graph fails and such an input was sent, the error names it."""
        spec = self._check_signature(signature_name)
        with self._lock:
            self._check_open()
        if output_keys is not None:
            self._check_output_keys(spec, output_keys)
        arrays = self.validate(inputs, signature_name)
        dense = self._dense_defs[signature_name]
        keys = list(spec.outputs) if output_keys is None else list(output_keys)
        feeds = {dense.inputs[k].name: v for k, v in self._dense_feeds(arrays, dense).items()}
        try:
            values = self.run_tensors(feeds, [dense.outputs[k].name for k in keys])
        except Exception as exc:
            if _is_graph_error(exc):
                _raise_shape_error(spec, arrays, exc)
            raise
        return dict(zip(keys, values, strict=True))

    def run_tensors(self, feeds: dict[str, np.ndarray], fetches: list[str]) -> list[np.ndarray]:
        """One session run of the loaded graph: tensors by graph name in and out (what TF
        Serving's Classify, Regress and MultiInference do)."""
        key = (tuple(feeds), tuple(fetches))
        with self._lock:
            self._check_open()
            runner = self._callables.get(key)
            if runner is None:
                from tensorflow.core.protobuf import config_pb2

                if len(self._callables) >= _MAX_CALLABLES:
                    self._callables.clear()
                options = config_pb2.CallableOptions(feed=list(feeds), fetch=list(fetches))
                # Session.make_callable would check feed shapes in Python; TF Serving's
                # session does not, and neither does the C++ callable.
                runner = self._session._make_callable_from_options(options)
                self._callables[key] = runner
        return list(runner(*feeds.values()))

    def _dense_feeds(self, arrays: dict[str, np.ndarray], dense_def: Any) -> dict[str, Any]:
        """What the SavedModel's signature takes: key inputs resolved to vectors, the rest as is."""
        feeds: dict[str, Any] = {}
        for lookup in self._lookups:
            if lookup.feeds in dense_def.inputs:
                feeds[lookup.feeds] = self._lookup_vectors(lookup, arrays[lookup.input])
        for name, array in arrays.items():
            if name in dense_def.inputs:
                feeds[name] = array
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
        """Release the session (and the parameter server this version holds); later `run`
        calls raise NotFoundError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._callables = {}
            session, self._session = self._session, None
        try:
            session.close()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()


def _is_graph_error(exc: BaseException) -> bool:
    """Whether `exc` is TensorFlow's error from running a graph (tf.errors.OpError)."""
    return any(c.__name__ == "OpError" for c in type(exc).__mro__)


def _raise_shape_error(spec: SignatureSpec, arrays: dict[str, np.ndarray], exc: Any) -> None:
    """When the graph failed on an input whose shape the signature does not declare, say so
    (the graph's own message, e.g. of a MatMul, rarely names the input)."""
    for name, tensor_spec in spec.inputs.items():
        if not tensor_spec.accepts_shape(arrays[name].shape):
            detail = str(getattr(exc, "message", exc)).split("\n", 1)[0]
            raise InvalidInputError(
                f"input '{name}': shape [{','.join(map(str, arrays[name].shape))}] is not "
                f"compatible with the signature's {tensor_spec.describe()}, and the model "
                f"failed on it: {detail}"
            ) from None


@dataclass(frozen=True)
class VersionTables:
    """The parameter-server config an external version's lookups read, and its identity.

    Two versions with equal `key` read equal tables under equal settings, so one loaded
    parameter server can serve both (`keras_hps.serving` shares it)."""

    path: str  # the hps.json file
    key: str  # the config with each table file replaced by its content digest or identity
    shared: bool  # a repository-wide hps.json named by a manifest from before version pinning


def _table_identity(path: str) -> str:
    """Identity of a table file (or HPS table directory) whose digest is not recorded."""
    real = os.path.realpath(path)
    files = sorted(os.path.join(real, n) for n in os.listdir(real)) if os.path.isdir(real) \
        else [real]
    stats = [(os.path.basename(f), os.stat(f)) for f in files]
    return f"file:{real}:" + ";".join(
        f"{n}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}" for n, st in stats)


def config_tables(path: str | os.PathLike, digests: dict[tuple[str, int], str] | None = None
                  ) -> VersionTables:
    """The identity of the parameter-server config at `path`: its settings, with each table
    file replaced by its digest in `digests` ((model, table id) -> digest) or else by the
    file's identity (path, size, modification time)."""
    path = os.path.abspath(os.fspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the parameter-server config: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list):
        raise ConfigError(f"{path}: expected an object with a 'models' list")
    digests = digests or {}
    folder = os.path.dirname(path)
    models = []
    for model in raw["models"]:
        if not isinstance(model, dict) or not isinstance(model.get("sparse_files"), list):
            raise ConfigError(f"{path}: every model needs a 'sparse_files' list")
        name = model.get("model")
        tables = [
            digests.get((name, t))
            or _table_identity(os.path.join(folder, os.path.expanduser(str(f))))
            for t, f in enumerate(model["sparse_files"])
        ]
        models.append({**model, "sparse_files": tables})
    key = json.dumps({**raw, "models": models}, sort_keys=True)
    return VersionTables(path, key, shared=False)


def version_tables(version_dir: str | os.PathLike) -> VersionTables | None:
    """What an external version's lookups read (None for a plain SavedModel)."""
    version_dir = os.path.abspath(os.fspath(version_dir))
    manifest = read_manifest(version_dir)
    if manifest is None:
        return None
    where = os.path.join(version_dir, MANIFEST_NAME)
    rel = manifest.get("hps_config")
    if not rel:
        raise ConfigError(
            f"{where}: no 'hps_config'; re-export the version, or give the server the "
            "parameter-server config with --hps_config"
        )
    path = os.path.normpath(os.path.join(version_dir, rel))
    if not os.path.exists(path):
        raise ConfigError(f"{version_dir}: the manifest's hps_config {path} does not exist")
    digests = {}
    for i, entry in enumerate(manifest.get("tables") or ()):
        try:
            digests[(str(entry["model"]), int(entry["table_id"]))] = "sha256:" + str(
                entry["sha256"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: tables[{i}] is malformed: {e!r}") from e
    tables = config_tables(path, digests)
    shared = os.path.dirname(path) != version_dir
    return VersionTables(tables.path, tables.key, shared)


def _load_session(version_dir: str, tags: tuple[str, ...], session_config: Any) -> tuple[Any, Any]:
    """(session, MetaGraphDef) of the version's `tags` MetaGraph, restored and initialised
    in a graph of its own, as TF Serving loads a SavedModel."""
    import tensorflow as tf
    from tensorflow.python.saved_model import loader_impl

    loader = loader_impl.SavedModelLoader(version_dir)
    if not any(set(m.meta_info_def.tags) == set(tags) for m in loader.saved_model.meta_graphs):
        raise _meta_graph_not_found(tags)
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph, config=session_config)
    try:
        with graph.as_default():
            meta_graph = loader.load(session, list(tags))
    except BaseException:
        session.close()
        raise
    return session, meta_graph


def load_servable(
    version_dir: str | os.PathLike,
    parameter_server: Any = None,
    *,
    tags: tuple[str, ...] = SERVE_TAGS,
    session_config: Any = None,
    on_close: Callable[[], None] | None = None,
) -> Servable:
    """Load `<base_path>/<version>/` for serving.

    A plain SavedModel is served as is. An external-placement export (with a keras-hps
    manifest) resolves its key inputs through `parameter_server`; without one, through a
    parameter server of its own built from the config its manifest pins (closed with the
    servable). `tags` picks the MetaGraph (TF Serving's `--saved_model_tags`),
    `session_config` is the `ConfigProto` of its session, and `on_close` runs once after the
    servable closes.
    """
    version_dir = os.path.abspath(os.fspath(version_dir))
    if not os.path.isfile(os.path.join(version_dir, "saved_model.pb")):
        raise NotFoundError(f"{version_dir}: not a SavedModel directory (no saved_model.pb)")
    manifest = read_manifest(version_dir)
    lookups = (
        [] if manifest is None else _parse_lookups(manifest, os.path.join(version_dir,
                                                                          MANIFEST_NAME))
    )
    owned = None
    if lookups and parameter_server is None:
        from keras_hps.parameter_server import ParameterServer

        tables = version_tables(version_dir)
        parameter_server = owned = ParameterServer(tables.path)
    session = None
    try:
        session, meta_graph = _load_session(version_dir, tuple(tags), session_config)
        signature_defs = _callable_signatures(meta_graph)
        for lookup in lookups:
            if not any(lookup.feeds in sig.inputs for sig in signature_defs.values()):
                raise ConfigError(
                    f"{version_dir}: manifest lookup for input {lookup.input!r} feeds "
                    f"{lookup.feeds!r}, which no signature of the SavedModel takes"
                )
            # NotFoundError names an unknown model or table
            parameter_server.table_spec(lookup.model, lookup.table_id)
    except BaseException:
        if session is not None:
            session.close()
        if owned is not None:
            owned.close()
        raise
    if owned is not None:
        then = on_close

        def on_close() -> None:  # the servable's own parameter server goes with it
            owned.close()
            if then is not None:
                then()

    return Servable(version_dir, session, signature_defs, lookups, parameter_server, on_close)
