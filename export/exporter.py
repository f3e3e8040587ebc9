"""`export_for_serving`: trained Keras model -> TF Serving model repository (+ hps.json, tables)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keras_hps.errors import ConfigError, NotFoundError
from keras_hps.export import repository as repo
from keras_hps.export.dissection import EmbeddingTable, dissect
from keras_hps.export.graph import (
    as_functional,
    call_with_named_inputs,
    flat_outputs,
    input_names,
    output_names,
)
from keras_hps.export.inference import (
    check_against_tables,
    embedded_model,
    lookup_calls,
    rewire_inference,
)
from keras_hps.export.saved_model_writer import save_saved_model
from keras_hps.export.split import Split, split_for_external
from keras_hps.export.warmup import write_warmup
from keras_hps.external import MANIFEST_FORMAT, MANIFEST_NAME, VERSION_HPS_CONFIG
from keras_hps.formats.io import temp_sibling
from keras_hps.servable import TensorSpec

PLACEMENTS = ("external", "embedded")
KEYS_SIGNATURE = "keras_hps_keys"  # the external version's keys step (not a public signature)
EXPORT_INFO = os.path.join("assets.extra", "keras_hps_export.json")


@dataclass
class ExportResult:
    """What one export wrote."""

    model_name: str
    version: int
    placement: str
    version_dir: str
    models_config: str
    hps_json: str | None = None
    table_files: list[str] = field(default_factory=list)
    # Which wrote the SavedModel's variables: "bundle" (keras-hps' checkpoint writer) or
    # "savev2" (TensorFlow's, the fallback); both give the same files.
    checkpoint_writer: str | None = None


def _load_model(model: Any) -> Any:
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.exists(path):
            raise NotFoundError(f"model file {path} does not exist")
        import keras

        try:
            return keras.saving.load_model(path)
        except Exception as e:
            raise ConfigError(f"{path}: cannot load the Keras model: {_load_failure(e)}") from e
    return model


def _load_failure(error: Exception) -> str:
    """One line for why `keras.saving.load_model` failed: the class it could not locate,
    else the first line of the innermost message (Keras nests config dumps in them)."""
    import re

    text = str(error)
    missing = re.search(r"Could not locate (class|function) '([^']+)'", text)
    if missing:
        return (f"{missing.group(1)} {missing.group(2)!r} is not registered: import the module "
                "that defines it first (keras-hps export --custom-module MODULE_OR_FILE.py); "
                "it must be decorated with @keras.saving.register_keras_serializable()")
    inner = text.rsplit("Exception encountered:", 1)[-1].strip()
    return inner.splitlines()[0] if inner else type(error).__name__


def _per_table(value: Any, tables: Sequence[EmbeddingTable], what: str, default: Any) -> list:
    """A per-table setting given as one value, a list by table id, or a dict by layer name."""
    if value is None:
        return [default] * len(tables)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {t.layer_name for t in tables})
        if unknown:
            raise ConfigError(f"{what} names unknown table layer(s) {unknown}")
        return [value.get(t.layer_name, default) for t in tables]
    if isinstance(value, (list, tuple)):
        if len(value) != len(tables):
            raise ConfigError(f"{what} has {len(value)} entries for {len(tables)} table(s)")
        return list(value)
    return [value] * len(tables)


def _spec_of(tensor: Any) -> TensorSpec:
    import tensorflow as tf

    return TensorSpec(np.dtype(tf.as_dtype(tensor.dtype).as_numpy_dtype), tuple(tensor.shape))


def _tf_specs(specs: Mapping[str, TensorSpec]) -> dict[str, Any]:
    import tensorflow as tf

    return {
        n: tf.TensorSpec(s.shape, tf.as_dtype(s.dtype), name=n) for n, s in specs.items()
    }


@dataclass
class _Signature:
    """One signature to write: a Keras model called on named inputs, with named outputs."""

    model: Any
    input_names: list[str]  # the model's inputs by name, in model.inputs order
    output_names: list[str]  # names of the model's flat outputs
    specs: dict[str, TensorSpec]  # what the signature takes (may include unused inputs)


def _resources(models: Sequence[Any]) -> list[Any]:
    """The TF resources (vocabulary hash tables of StringLookup / IntegerLookup, ...) the
    models' layers hold, which the SavedModel must track besides the variables."""
    import tensorflow as tf

    found: dict[int, Any] = {}
    for model in models:
        for layer in model._flatten_layers(include_self=False, recursive=True):
            for value in vars(layer).values():
                if isinstance(value, tf.saved_model.experimental.TrackableResource):
                    found.setdefault(id(value), value)
    return list(found.values())


def _write_saved_model(path: str, signatures: Mapping[str, _Signature],
                       progress: bool = False) -> str:
    """Write a SavedModel with one function per signature (each takes its specs by name and
    returns its outputs by name); returns which writer wrote its variables (see
    `save_saved_model`).

    Not through keras.export.ExportArchive: it tracks each variable twice (the Keras variable
    and its tf.Variable), which writes every table twice. Here each tf.Variable is tracked once.
    """
    import tensorflow as tf

    module = tf.Module()
    models = [sig.model for sig in signatures.values()]
    variables: dict[int, Any] = {}
    for model in models:
        for v in model.variables:
            variables.setdefault(id(v.value), v.value)
    # Tracked once each: the signatures below are the only functions saved.
    module.weights = list(variables.values())
    module.resources = _resources(models)
    functions = {}
    for name, sig in signatures.items():
        functions[name] = _serving_function(sig).get_concrete_function()
    return save_saved_model(module, path, functions, progress=progress)


def _serving_function(sig: _Signature) -> Any:
    import tensorflow as tf

    @tf.function(input_signature=[_tf_specs(sig.specs)], autograph=False)
    def serve(inputs: dict[str, Any]) -> dict[str, Any]:
        result = call_with_named_inputs(sig.model, sig.input_names, inputs)
        return dict(zip(sig.output_names, flat_outputs(result), strict=True))

    return serve


def _keys_per_sample(calls: Sequence[Any], tables: Sequence[EmbeddingTable],
                     given: list[Any]) -> list[int]:
    counts = [0] * len(tables)
    for call in calls:
        tid = call.layer.table_id
        dims = tuple(call.ids.shape)[1:]
        if given[tid] is not None:
            continue
        if any(d is None for d in dims):
            raise ConfigError(
                f"table {tables[tid].layer_name!r} is fed ids of shape {tuple(call.ids.shape)}; "
                "with a variable number of keys per sample pass max_keys_per_sample="
                f"{{{tables[tid].layer_name!r}: N}}"
            )
        counts[tid] += math.prod(dims) if dims else 1
    return [int(g) if g is not None else max(c, 1) for g, c in zip(given, counts, strict=True)]


def export_for_serving(
    model: Any,
    repo_dir: str | os.PathLike,
    model_name: str,
    version: int | None = None,
    tables: str = "external",
    *,
    embedding_layers: Sequence[str] | None = None,
    keys: Mapping[str, Any] | None = None,
    inference_model: Any = None,
    default_value: Any = None,
    max_batch_size: int = 1024,
    max_keys_per_sample: Any = None,
    warmup_records: int = 3,
    serving_repo_path: str | None = None,
    progress: bool = False,
) -> ExportResult:
    """Write `model` into the TF Serving model repository `repo_dir` as `model_name`.

    Args:
        model: a trained Keras 3 model (functional or Sequential) or the path of a `.keras`
            file.
        repo_dir: the repository (created if missing; its parent must exist).
        model_name: the served name ([A-Za-z0-9_-], at most 120 characters).
        version: the version number; default the next free one. An existing one is an error.
        tables: "external" (tables in HDF5/HPS files under `repo_dir`, read through the
            keras-hps parameter server) or "embedded" (tables inside the SavedModel as
            variables, read with native TF ops: stock TF Serving serves it).
        embedding_layers: names of the layers holding tables; default every Embedding.
        keys: `{layer_name: key array}`: row i of that table serves key k_i.
        inference_model: for models whose graph cannot be rewritten (subclassed): the
            same computation with keras_hps lookup layers bound to `model_name`.
        default_value: the vector value of unknown keys: one number, or per table.
        max_batch_size: hps.json's max_batch_size for the model (external): with the keys
            per sample, the size of one lookup through the hierarchy, not a request limit
            (larger requests are looked up in pieces).
        max_keys_per_sample: keys per sample per table, where the input shape does not say.
        warmup_records: number of PredictionLog records in the warmup file.
        serving_repo_path: where the model server will see `repo_dir` (e.g. "/models" inside
            a container); models.config's base_path is `<serving_repo_path>/<model_name>`.
            Default: `repo_dir`'s absolute path.
        progress: show progress bars while writing tables.

    Returns:
        An `ExportResult` naming what was written. On any error nothing is left behind.
    """
    if tables not in PLACEMENTS:
        raise ConfigError(f"tables must be one of {PLACEMENTS}, got {tables!r}")
    repo.check_model_name(model_name)
    repo_dir = os.path.abspath(os.fspath(repo_dir))
    parent = os.path.dirname(repo_dir)
    if not os.path.isdir(repo_dir) and not os.path.isdir(parent):
        raise NotFoundError(f"repository {repo_dir}: its parent folder {parent} does not exist")
    if os.path.exists(repo_dir) and not os.path.isdir(repo_dir):
        raise ConfigError(f"repository {repo_dir} exists and is not a folder")
    model_dir = os.path.join(repo_dir, model_name)
    version = repo.choose_version(model_dir, version)
    keras_model = _load_model(model)
    # Read both config files now, so a malformed one fails before anything is written.
    config_path = os.path.join(repo_dir, repo.MODELS_CONFIG)
    repo.read_models_config(config_path)
    hps_path = os.path.join(repo_dir, repo.HPS_JSON)
    if tables == "external":
        hps_settings = repo.read_hps_json(hps_path)

    table_list = dissect(keras_model, embedding_layers, keys)
    if inference_model is None:
        inference = rewire_inference(keras_model, model_name, table_list).model
        out_names = output_names(as_functional(keras_model))
    else:
        inference = inference_model
        out_names = output_names(inference)
    rewired = lookup_calls(inference, model_name)
    calls = rewired.calls
    names = input_names(inference)
    for t, n in zip(inference.inputs, names, strict=True):
        if getattr(t, "sparse", False) or getattr(t, "ragged", False):
            raise ConfigError(
                f"input {n!r} is {'sparse' if t.sparse else 'ragged'}: a TF Serving signature "
                "takes dense tensors. Give the model a dense int input padded with -1 (pooled "
                "lookups skip -1) and export that"
            )
    check_against_tables(calls, table_list)
    defaults = [float(v) for v in _per_table(default_value, table_list, "default_value", 0.0)]
    in_specs = {n: _spec_of(t) for n, t in zip(names, inference.inputs, strict=True)}
    key_samples = {c.input_name: table_list[c.layer.table_id].keys for c in calls
                   if c.input_name is not None}
    if tables == "external":
        split = split_for_external(rewired)
        signatures = _external_signatures(split, in_specs, out_names)
        keys_per_sample = _keys_per_sample(calls, table_list, _per_table(
            max_keys_per_sample, table_list, "max_keys_per_sample", None))
    else:
        signatures = {"serving_default": _Signature(
            embedded_model(inference, table_list, defaults), names, out_names, in_specs)}

    txn = repo.Transaction()
    result = ExportResult(model_name, version, tables, os.path.join(model_dir, str(version)),
                          config_path)
    try:
        if not os.path.isdir(repo_dir):
            os.mkdir(txn.created(repo_dir))
        with repo.locked(repo_dir):  # what killed exports left, before writing more
            repo.recover(repo_dir)
        if not os.path.isdir(model_dir):
            os.mkdir(txn.created(model_dir))
        # Everything is written under hidden names that record this process (a server never
        # reads them) and published under the lock by `repo.publish`.
        tmp = txn.created(str(temp_sibling(Path(result.version_dir))))
        staged_tables = hps_entry = None
        if tables == "embedded":
            result.checkpoint_writer = _write_saved_model(tmp, signatures, progress)
        else:
            result.hps_json = hps_path
            table_dir = os.path.join(repo_dir, repo.TABLES_DIR, model_name, str(version))
            _make_dirs(txn, os.path.dirname(table_dir))
            staged_tables = txn.created(str(temp_sibling(Path(table_dir))))
            os.mkdir(staged_tables)
            # Table files are written by worker threads (file writes release the GIL) while
            # this thread builds and saves the dense part; leaving the block waits for them.
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="keras-hps-export") as pool:
                pending = _write_tables(pool, staged_tables, table_list, progress)
                digests = [pool.submit(_table_digest, t) for t in table_list]
                result.checkpoint_writer = _write_saved_model(tmp, signatures)
                result.table_files = [os.path.join(table_dir, os.path.basename(h5))
                                      for h5, _ in pending]
                for _, futures in pending:
                    for future in futures:
                        future.result()
            hps_entry = _hps_entry(model_name, repo_dir, result.table_files, table_list,
                                   defaults, max_batch_size, keys_per_sample)
            _pin_tables(tmp, result.version_dir, hps_settings, hps_entry, result.table_files)
            _write_manifest(tmp, model_name, split, in_specs,
                            {t.table_id: d.result() for t, d in zip(table_list, digests,
                                                                    strict=True)})
        write_warmup(tmp, model_name, in_specs, key_samples, warmup_records)
        _write_export_info(tmp, model_name, tables, table_list, defaults)
        base_path = model_dir if serving_repo_path is None else (
            serving_repo_path.rstrip("/") + "/" + model_name)
        publication = repo.Publication(model_name, version, base_path, tmp, staged_tables,
                                       hps_entry)
        # Concurrent exports into one repository take turns here (and roll back under the
        # lock), so none loses another's models.config or hps.json entries.
        with repo.locked(repo_dir):
            try:
                repo.publish(repo_dir, txn, publication)
            except BaseException:
                txn.rollback()
                raise
    except BaseException:
        txn.rollback()
        raise
    return result


def _write_export_info(version_dir: str, model_name: str, placement: str,
                       table_list: Sequence[EmbeddingTable], defaults: list[float]) -> None:
    """`assets.extra/keras_hps_export.json`: what `keras-hps inspect` reports of a version
    (TF Serving ignores assets.extra apart from the warmup file)."""
    info = {
        "model_name": model_name,
        "placement": placement,
        "tables": [
            {"table_id": t.table_id, "name": t.layer_name, "rows": t.rows, "dim": t.dim,
             "default_value": d}
            for t, d in zip(table_list, defaults, strict=True)
        ],
    }
    with open(os.path.join(version_dir, EXPORT_INFO), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


def _make_dirs(txn: repo.Transaction, path: str) -> None:
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for p in reversed(missing):
        os.mkdir(txn.created(p))


def _write_tables(pool: ThreadPoolExecutor, table_dir: str,
                  table_list: Sequence[EmbeddingTable],
                  progress: bool) -> list[tuple[str, list[Future]]]:
    """Start writing each table as an HPS directory and as an HDF5 table; (h5 path, futures)
    each. Keys in sorted order (the default, row index) are written once: the HDF5 table is a
    header whose datasets are stored in the HPS files. Other key orders need a second, sorted
    copy in the HDF5 file."""
    from keras_hps.formats import write_hdf5_table, write_hdf5_table_over_hps, write_hps_table

    def shared(h5: str, hps: str, t: EmbeddingTable) -> None:
        write_hps_table(hps, t.keys, t.vectors, progress=progress)
        write_hdf5_table_over_hps(h5, hps, dim=t.dim)

    pending = []
    for t in table_list:
        h5 = os.path.join(table_dir, f"{t.layer_name}.h5")
        hps = os.path.join(table_dir, t.layer_name)
        if t.rows and bool(np.all(t.keys[1:] > t.keys[:-1])):
            futures = [pool.submit(shared, h5, hps, t)]
        else:
            futures = [
                pool.submit(write_hdf5_table, h5, t.keys, t.vectors, progress=progress),
                pool.submit(write_hps_table, hps, t.keys, t.vectors, progress=progress),
            ]
        pending.append((h5, futures))
    return pending


def _external_signatures(split: Split, in_specs: Mapping[str, TensorSpec],
                         out_names: list[str]) -> dict[str, _Signature]:
    """The external version's SavedModel signatures: the dense part as `serving_default`
    and, when the graph computes keys, the keys step (taking every public input)."""
    specs = dict(in_specs)
    if split.keys_step is not None:
        specs.update(zip(split.keys_outputs, map(_spec_of, split.keys_step.outputs),
                         strict=True))
    for call, _, vectors in split.lookups:
        specs[vectors] = _spec_of(call.output)
    dense = _Signature(split.dense, split.dense_inputs, out_names,
                       {n: specs[n] for n in split.dense_inputs})
    signatures = {"serving_default": dense}
    if split.keys_step is not None:
        signatures[KEYS_SIGNATURE] = _Signature(split.keys_step, split.keys_inputs,
                                                split.keys_outputs, dict(in_specs))
    return signatures


def _table_digest(t: EmbeddingTable) -> str:
    """SHA-256 of a table's content (dim, keys, vectors): equal digests serve equal lookups."""
    h = hashlib.sha256(np.int64(t.dim).tobytes())
    h.update(np.ascontiguousarray(t.keys, "<i8").data)
    h.update(np.ascontiguousarray(t.vectors, "<f4").data)
    return h.hexdigest()


def _pin_tables(tmp: str, version_dir: str, settings: dict[str, Any], entry: dict[str, Any],
                files: list[str]) -> None:
    """`<version>/hps.json`: the repository's parameter-server settings with this version's
    model entry alone, naming this version's table files (relative to the version folder, so
    the repository can move). The server loads each version from its own copy."""
    own = {**entry, "sparse_files": [os.path.relpath(f, version_dir) for f in files]}
    config = {**{k: v for k, v in settings.items() if k != "models"}, "models": [own]}
    with open(os.path.join(tmp, VERSION_HPS_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def _write_manifest(version_dir: str, model_name: str, split: Split,
                    in_specs: Mapping[str, TensorSpec], digests: dict[int, str]) -> None:
    """`keras_hps_manifest.json` (format in `keras_hps.external`): format 1 where every
    lookup reads a model input, else format 2 with the keys step. It names this version's
    own parameter-server config (`_pin_tables`) and each table's content digest."""
    lookups = []
    for call, keys, vectors in split.lookups:
        entry: dict[str, Any] = {"input" if split.keys_step is None else "keys": keys,
                                 "feeds": vectors, "model": model_name,
                                 "table_id": int(call.layer.table_id),
                                 "combiner": getattr(call.layer, "combiner", None)}
        if split.keys_step is None:
            spec = in_specs[keys]
            entry.update(dtype=spec.dtype.name,
                         shape=None if spec.shape is None else list(spec.shape))
        lookups.append(entry)
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT,
                                "format_version": 1 if split.keys_step is None else 2,
                                "model_name": model_name,
                                "hps_config": VERSION_HPS_CONFIG,
                                "tables": [{"model": model_name, "table_id": t, "sha256": d}
                                           for t, d in sorted(digests.items())]}
    if split.keys_step is not None:
        manifest["keys_step"] = {"signature": KEYS_SIGNATURE}
        manifest["dense"] = {"signature": "serving_default"}
    manifest["lookups"] = lookups
    with open(os.path.join(version_dir, MANIFEST_NAME), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


def _hps_entry(model_name: str, repo_dir: str, files: list[str],
               table_list: Sequence[EmbeddingTable], defaults: list[float],
               max_batch_size: int, keys_per_sample: list[int]) -> dict[str, Any]:
    return {
        "model": model_name,
        "sparse_files": [os.path.relpath(f, repo_dir) for f in files],
        "embedding_table_names": [t.layer_name for t in table_list],
        "embedding_vecsize_per_table": [t.dim for t in table_list],
        "maxnum_catfeature_query_per_table_per_sample": keys_per_sample,
        "default_value_for_each_table": defaults,
        "deployed_device_list": [0],
        "max_batch_size": int(max_batch_size),
    }
