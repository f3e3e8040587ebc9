"""Run one exported model version: a plain SavedModel or a keras-hps external-placement export.

`load_servable(version_dir)` is the single way the model server (and tests, and users)
load a version directory. Every version is loaded the way TensorFlow Serving loads it: the
MetaGraph of the requested tags is imported into a graph of its own and run in a session,
so TF1 graph SavedModels and TF2 SavedModels (`tf.saved_model.save`, Keras `model.export`)
are served alike, and a request is checked only where TF Serving checks it (an input of
shape `[3]` for a signature that declares `[?,1]` is computed, as there).

A directory without a keras-hps manifest is served as is. A directory with
`keras_hps_manifest.json` is an external-placement export: its SavedModel holds the model cut
at its lookups (a keys step, when the graph computes keys, and the dense part), and the
servable runs the manifest's dataflow (`keras_hps.external`: keys step -> lookups through a
parameter server -> dense part), so its public signature takes the trained model's inputs.
The manifest pins the parameter-server config of the version (`hps_config`) and the content
digest of each of its tables, so each version answers from its own tables and versions with
equal tables can share one loaded copy (`version_tables`).
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
from keras_hps.external import (
    MANIFEST_NAME,
    Dataflow,
    ExternalRunner,
    public_signature_defs,
    read_dataflow,
)

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


def _spec_from_tensor_info(info: Any) -> TensorSpec:
    import tensorflow as tf

    dtype = np.dtype(tf.dtypes.as_dtype(info.dtype).as_numpy_dtype)
    if info.tensor_shape.unknown_rank:
        return TensorSpec(dtype, None)
    shape = tuple(None if d.size < 0 else int(d.size) for d in info.tensor_shape.dim)
    return TensorSpec(dtype, shape)


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


def describe_version(
    version_dir: str | os.PathLike, tags: tuple[str, ...] = SERVE_TAGS
) -> tuple[str, dict[str, SignatureSpec]]:
    """A version's placement ("embedded" | "external") and public signatures, read from its
    files without loading the graph."""
    version_dir = os.fspath(version_dir)
    flow = read_dataflow(version_dir)
    defs = _read_signature_defs(version_dir, tags)
    public = defs if flow is None else public_signature_defs(flow, defs)
    specs = {k: _spec_from_signature_def(v) for k, v in public.items()}
    return ("embedded" if flow is None else "external"), specs


class Servable:
    """A loaded model version: signatures, validated thread-safe `run`, and `close`."""

    def __init__(
        self,
        path: str,
        session: Any,
        signature_defs: dict[str, Any],
        flow: Dataflow | None = None,
        parameter_server: Any = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.name = os.path.basename(os.path.dirname(path))
        base = os.path.basename(path)
        self.version: int | None = int(base) if base.isdigit() else None
        self.placement = "embedded" if flow is None else "external"
        self._session = session
        self._on_close = on_close
        self._graph_defs = signature_defs
        #: the parameter server answering this version's lookups (None: embedded placement)
        self.parameter_server = None if flow is None else parameter_server
        self._external = None if flow is None else ExternalRunner(
            flow, signature_defs, self._run_signature, parameter_server, where=path)
        self._signature_defs = (
            signature_defs if flow is None else public_signature_defs(flow, signature_defs))
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
        keys = list(spec.outputs) if output_keys is None else list(output_keys)
        try:
            if self._external is not None:
                return self._external.run(arrays, signature_name, keys)
            return self._run_signature(signature_name, arrays, keys)
        except Exception as exc:
            if _is_graph_error(exc):
                _raise_shape_error(spec, arrays, exc)
            raise

    def _run_signature(self, signature_name: str, inputs: dict[str, np.ndarray],
                       output_keys: list[str]) -> dict[str, np.ndarray]:
        """One SavedModel signature (by its graph's SignatureDef) in this version's session."""
        sig = self._graph_defs[signature_name]
        values = self.run_tensors({sig.inputs[k].name: v for k, v in inputs.items()},
                                  [sig.outputs[k].name for k in output_keys])
        return dict(zip(output_keys, values, strict=True))

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
    flow = read_dataflow(version_dir)
    if flow is None:
        return None
    where = os.path.join(version_dir, MANIFEST_NAME)
    rel = flow.hps_config
    if not rel:
        raise ConfigError(
            f"{where}: no 'hps_config'; re-export the version, or give the server the "
            "parameter-server config with --hps_config"
        )
    path = os.path.normpath(os.path.join(version_dir, rel))
    if not os.path.exists(path):
        raise ConfigError(f"{version_dir}: the manifest's hps_config {path} does not exist")
    tables = config_tables(path, flow.digests)
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
    flow = read_dataflow(version_dir)
    owned = None
    if flow is not None and parameter_server is None:
        from keras_hps.parameter_server import ParameterServer

        tables = version_tables(version_dir)
        parameter_server = owned = ParameterServer(tables.path)
    if owned is not None:
        then = on_close

        def on_close() -> None:  # the servable's own parameter server goes with it
            owned.close()
            if then is not None:
                then()

    session = None
    try:
        session, meta_graph = _load_session(version_dir, tuple(tags), session_config)
        return Servable(version_dir, session, _callable_signatures(meta_graph), flow,
                        parameter_server, on_close)
    except BaseException:
        if session is not None:
            session.close()
        if owned is not None:
            owned.close()
        raise
