"""What the lookup layers share, whatever the Keras backend: arguments, input checks, the
table binding, and each layer's backend-neutral half.

A layer names tables (`model_name`, `table_id`) of a parameter server. It holds no weights:
every call reads the tables through `ParameterServer.lookup`, which checks the keys. The
server is the process's default one (`keras_hps.init(...)`), or, when the layer was given
`ps_config_file`, the one for that config in the process's registry, initialised on first use
(once per config, as HPS's implicit init).

Each public layer is a thin class over a backend class picked once at import
(`keras_hps.layers.backend`, the keras-rs pattern); the backend classes subclass the neutral
classes here and add only what differs: how the lookup crosses into the parameter server and
how bags are built.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from keras_hps import parameter_server
from keras_hps.combiner import COMBINERS
from keras_hps.errors import ConfigError, InvalidInputError

SUPPORTED_BACKENDS = ("tensorflow", "torch")
# Guards every layer's (parameter server, table specs) binding; module-level so that
# layers stay copyable (a lock attribute cannot be deep-copied or pickled).
_BINDING_LOCK = threading.Lock()
ID_DTYPES = ("int32", "int64")


def input_kind(x: Any) -> str:
    """"sparse", "ragged" or "dense" for a KerasTensor or a backend tensor."""
    if getattr(x, "sparse", False) is True or type(x).__name__ == "SparseTensor":
        return "sparse"
    if getattr(x, "ragged", False) is True or type(x).__name__ == "RaggedTensor":
        return "ragged"
    return "dense"


@dataclass
class Bags:
    """Ids as bags, in a backend's tensors: `values[i]` (padding dropped) belongs to bag
    `segments[i]`, with weight `weights[i]` (None: 1), of `num_bags` bags laid out as
    `outer_shape` (e.g. `[batch]` or `[batch, slots]`; the combined output has shape
    `outer_shape + [dim]`). `offsets` (torch) are the same bags in CSR form; `static_outer`
    (TensorFlow) the outer shape as far as it is known when tracing."""

    values: Any
    segments: Any
    weights: Any
    num_bags: Any
    outer_shape: Any
    static_outer: Any = None
    offsets: Any = None


def check_id_dtype(dtype: Any, where: str, what: str = "ids") -> None:
    """InvalidInputError unless `dtype` is int32 or int64."""
    name = keras.backend.standardize_dtype(dtype)
    if name not in ID_DTYPES:
        raise InvalidInputError(f"{where}: {what} must be int32 or int64, got {name}")


def _is_int(x: Any, low: int) -> bool:
    return not isinstance(x, bool) and isinstance(x, int) and x >= low


def check_layer_args(layer: str, model_name: Any, table_ids: Sequence[Any],
                     emb_vec_sizes: Sequence[Any], emb_vec_dtype: Any,
                     global_batch_size: Any) -> str:
    """ConfigError (RuntimeError for an unsupported backend) for bad constructor arguments;
    returns the standardized `emb_vec_dtype`."""
    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise RuntimeError(
            f"{layer} supports the Keras backends {SUPPORTED_BACKENDS}; the current backend "
            f"is {backend!r}. Set KERAS_BACKEND=tensorflow or torch."
        )
    if not isinstance(model_name, str) or not model_name:
        raise ConfigError(f"model_name must be a non-empty string, got {model_name!r}")
    for table_id in table_ids:
        if not _is_int(table_id, 0):
            raise ConfigError(f"table_id must be a non-negative int, got {table_id!r}")
    for size in emb_vec_sizes:
        if not _is_int(size, 1):
            raise ConfigError(f"emb_vec_size must be a positive int, got {size!r}")
    dtype = keras.backend.standardize_dtype(emb_vec_dtype)
    if "float" not in dtype:
        raise ConfigError(f"emb_vec_dtype must be a float dtype, got {emb_vec_dtype!r}")
    if global_batch_size is not None and not _is_int(global_batch_size, 1):
        raise ConfigError(
            f"global_batch_size must be a positive int or None, got {global_batch_size!r}"
        )
    return dtype


class _Binding:
    """The parameter-server side of a layer: its config file, tables and expected sizes, and
    the (server, specs) it is bound to, rebound once that server is closed."""

    def __init__(self, ps_config_file: str | None, model_name: str, table_ids: list[int],
                 emb_vec_sizes: list[int], global_batch_size: int | None) -> None:
        self.ps_config_file = ps_config_file
        self.model_name = model_name
        self.table_ids = table_ids
        self.emb_vec_sizes = emb_vec_sizes
        self.global_batch_size = global_batch_size
        self.bound: tuple[Any, list[Any]] | None = None

    def server(self, where: str) -> Any:
        """The parameter server, its tables checked against this layer (binding on first
        use and after the server it was bound to closed)."""
        bound = self.bound
        if bound is not None and not bound[0].closed:
            return bound[0]
        with _BINDING_LOCK:
            try:
                ps = parameter_server.ensure_parameter_server(self.ps_config_file)
            except RuntimeError as err:
                raise RuntimeError(f"{where}: {err}") from err
            specs = []
            for table_id, size in zip(self.table_ids, self.emb_vec_sizes, strict=True):
                spec = ps.table_spec(self.model_name, table_id)
                if spec.dim != size:
                    raise ConfigError(
                        f"{where}: table {table_id}: emb_vec_size={size} but the parameter "
                        f"server's config gives embedding_vecsize_per_table {spec.dim}"
                    )
                specs.append(spec)
            max_batch = ps.config.model(self.model_name).max_batch_size
            if self.global_batch_size is not None and self.global_batch_size > max_batch:
                raise ConfigError(
                    f"{where}: global_batch_size={self.global_batch_size} exceeds the "
                    f"model's max_batch_size {max_batch}"
                )
            self.bound = (ps, specs)
            return ps

    def reachable(self) -> bool:
        """Whether a parameter server can be bound now (without initialising one)."""
        if self.ps_config_file is not None:
            return True
        try:
            parameter_server.get_parameter_server()
        except RuntimeError:
            return False
        return True

    def __deepcopy__(self, memo: dict) -> _Binding:  # a copied layer binds anew
        return _Binding(self.ps_config_file, self.model_name, list(self.table_ids),
                              list(self.emb_vec_sizes), self.global_batch_size)


class _ServedLayer(keras.layers.Layer):
    """Common state of every lookup layer: tables of one model, read from a parameter server."""

    def _init_tables(self, model_name: str, table_ids: list[int], emb_vec_sizes: list[int],
                     emb_vec_dtype: str, ps_config_file: Any,
                     global_batch_size: int | None) -> None:
        self.model_name = model_name
        self.emb_vec_dtype = emb_vec_dtype
        self.ps_config_file = None if ps_config_file is None else str(ps_config_file)
        self.global_batch_size = global_batch_size
        # Lookups cross into Python (TF) or call Triton from Python (torch): no XLA.
        self.supports_jit = False
        self._tables = _Binding(self.ps_config_file, model_name, table_ids,
                                      emb_vec_sizes, global_batch_size)

    def _where(self) -> str:
        tables = self._tables.table_ids
        which = f"table {tables[0]}" if len(tables) == 1 else f"tables {tables}"
        return f"layer {self.name!r} (model {self.model_name!r}, {which})"

    def _server(self) -> Any:
        return self._tables.server(self._where())

    def build(self, input_shape: Any = None) -> None:
        """Check the tables against the parameter server when one is reachable now.

        Without `ps_config_file` and before `keras_hps.init`, the check waits for the
        first call, so a model can be built (and saved) on a machine without the tables.
        """
        if self._tables.reachable():
            self._server()
        self.built = True

    def _check_dense_ids(self, ids: Any, what: str) -> None:
        if input_kind(ids) != "dense":
            raise InvalidInputError(
                f"{self._where()}: {what} takes dense ids; use SparseLookupLayer for sparse "
                "or ragged input"
            )
        check_id_dtype(ids.dtype, self._where())

    def _cast(self, out: Any) -> Any:
        if self.emb_vec_dtype != "float32":
            out = keras.ops.cast(out, self.emb_vec_dtype)
        return out

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "model_name": self.model_name,
                "emb_vec_dtype": self.emb_vec_dtype,
                "ps_config_file": self.ps_config_file,
                "global_batch_size": self.global_batch_size,
            }
        )
        return config


class TableLookupLayer(_ServedLayer):
    """Base of `LookupLayer` and `SparseLookupLayer`: a non-trainable view of one table.

    Args:
        model_name: the model's `"model"` entry in the parameter-server config.
        table_id: index of the table in that model's `sparse_files`.
        emb_vec_size: the table's vector size; must equal `embedding_vecsize_per_table`.
        emb_vec_dtype: dtype of the output vectors (tables are float32; other float dtypes
            are cast from it).
        ps_config_file: path of an `hps.json`; when given, the layer reads the parameter
            server for that config (initialised on first use if none is running).
        global_batch_size: largest batch the layer will be called with; checked against
            the model's `max_batch_size` (kept for HPS compatibility).
    """

    def __init__(
        self,
        model_name: str,
        table_id: int,
        emb_vec_size: int,
        emb_vec_dtype: Any = "float32",
        ps_config_file: str | None = None,
        global_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        dtype = check_layer_args(type(self).__name__, model_name, [table_id], [emb_vec_size],
                                 emb_vec_dtype, global_batch_size)
        kwargs.setdefault("dtype", dtype)
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.table_id = table_id
        self.emb_vec_size = emb_vec_size
        self._init_tables(model_name, [table_id], [emb_vec_size], dtype, ps_config_file,
                          global_batch_size)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"table_id": self.table_id, "emb_vec_size": self.emb_vec_size})
        return config


class LookupBase(TableLookupLayer):
    """`LookupLayer` without its backend: the backend class adds `_lookup_ids(ps, ids)`."""

    def call(self, ids: Any) -> Any:
        self._check_dense_ids(ids, "LookupLayer")
        return self._cast(self._lookup_ids(self._server(), ids))

    def _lookup_ids(self, ps: Any, ids: Any) -> Any:
        raise NotImplementedError

    def compute_output_shape(self, input_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        return (*input_shape, self.emb_vec_size)

    def compute_output_spec(self, ids: Any) -> keras.KerasTensor:
        self._check_dense_ids(ids, "LookupLayer")
        return keras.KerasTensor(
            self.compute_output_shape(tuple(ids.shape)), dtype=self.emb_vec_dtype
        )


class SparseLookupBase(TableLookupLayer):
    """`SparseLookupLayer` without its backend: the backend class adds
    `_lookup_bags(ps, ids, weights, offsets, kind)`."""

    def __init__(self, *args: Any, combiner: str = "mean", **kwargs: Any) -> None:
        """`TableLookupLayer`'s arguments, plus `combiner`: sum | mean | sqrtn."""
        if combiner not in COMBINERS:
            raise ConfigError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
        super().__init__(*args, **kwargs)
        self.combiner = combiner

    def _check_inputs(self, ids: Any, weights: Any, offsets: Any) -> str:
        """Raise `InvalidInputError` for a wrong dtype, rank or form; return the input kind."""
        where = self._where()
        kind = input_kind(ids)
        check_id_dtype(ids.dtype, where)
        rank = len(ids.shape)
        if offsets is not None:
            if kind != "dense" or rank != 1:
                raise InvalidInputError(
                    f"{where}: with offsets, ids must be the 1-D dense values, got "
                    f"{kind} ids of rank {rank}"
                )
            if len(offsets.shape) != 1:
                raise InvalidInputError(
                    f"{where}: offsets must be 1-D [batch + 1], got shape {tuple(offsets.shape)}"
                )
            check_id_dtype(offsets.dtype, where, "offsets")
        elif rank not in (2, 3):
            raise InvalidInputError(
                f"{where}: {kind} ids must have rank 2 [batch, nnz] or 3 "
                f"[batch, slots, nnz], got rank {rank} (shape {tuple(ids.shape)})"
            )
        if weights is not None:
            if input_kind(weights) != kind:
                raise InvalidInputError(
                    f"{where}: weights must be {kind} like the ids, got {input_kind(weights)}"
                )
            if "float" not in keras.backend.standardize_dtype(weights.dtype):
                raise InvalidInputError(f"{where}: weights must be float, got {weights.dtype}")
            if len(weights.shape) != rank:
                raise InvalidInputError(
                    f"{where}: weights of shape {tuple(weights.shape)} do not match "
                    f"ids of shape {tuple(ids.shape)}"
                )
        return kind

    def call(self, ids: Any, weights: Any = None, offsets: Any = None) -> Any:
        if isinstance(weights, np.ndarray):
            weights = keras.ops.convert_to_tensor(weights)
        if isinstance(offsets, np.ndarray):
            offsets = keras.ops.convert_to_tensor(offsets)
        kind = self._check_inputs(ids, weights, offsets)
        ps = self._server()
        return self._cast(self._lookup_bags(ps, ids, weights, offsets, kind))

    def _lookup_bags(self, ps: Any, ids: Any, weights: Any, offsets: Any, kind: str) -> Any:
        raise NotImplementedError

    def compute_output_spec(
        self, ids: Any, weights: Any = None, offsets: Any = None
    ) -> keras.KerasTensor:
        self._check_inputs(ids, weights, offsets)
        if offsets is not None:
            n = offsets.shape[0]
            outer = (None if n is None else n - 1,)
        else:
            outer = tuple(ids.shape[:-1])
        return keras.KerasTensor((*outer, self.emb_vec_size), dtype=self.emb_vec_dtype)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["combiner"] = self.combiner
        return config


class FusedLookupBase(_ServedLayer):
    """`FusedLookupLayer` without its backend: the backend class adds
    `_lookup_tables(ps, ids)` (one list of vector tensors, one per table)."""

    def __init__(
        self,
        model_name: str,
        table_ids: list[int],
        emb_vec_sizes: int | list[int],
        emb_vec_dtype: Any = "float32",
        ps_config_file: str | None = None,
        global_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        table_ids = list(table_ids) if isinstance(table_ids, list | tuple) else table_ids
        if not isinstance(table_ids, list) or not table_ids:
            raise ConfigError(f"table_ids must be a non-empty list of ints, got {table_ids!r}")
        if isinstance(emb_vec_sizes, int) and not isinstance(emb_vec_sizes, bool):
            emb_vec_sizes = [emb_vec_sizes] * len(table_ids)
        if not isinstance(emb_vec_sizes, list | tuple):
            raise ConfigError(
                f"emb_vec_sizes must be an int or a list of ints, got {emb_vec_sizes!r}"
            )
        emb_vec_sizes = list(emb_vec_sizes)
        if len(emb_vec_sizes) != len(table_ids):
            raise ConfigError(
                f"emb_vec_sizes has {len(emb_vec_sizes)} entries for {len(table_ids)} tables"
            )
        dtype = check_layer_args(type(self).__name__, model_name, table_ids, emb_vec_sizes,
                                 emb_vec_dtype, global_batch_size)
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.table_ids = table_ids
        self.emb_vec_sizes = emb_vec_sizes
        self._init_tables(model_name, table_ids, emb_vec_sizes, dtype, ps_config_file,
                          global_batch_size)

    def _check_ids(self, ids: Any) -> list[Any]:
        if not isinstance(ids, list | tuple) or len(ids) != len(self.table_ids):
            got = f"{len(ids)} inputs" if isinstance(ids, list | tuple) else type(ids).__name__
            raise InvalidInputError(
                f"{self._where()}: takes a list of {len(self.table_ids)} id tensors, one per "
                f"table, got {got}"
            )
        for i in ids:
            self._check_dense_ids(i, "FusedLookupLayer")
        return list(ids)

    def call(self, ids: Any) -> list[Any]:
        ids = self._check_ids(ids)
        return [self._cast(o) for o in self._lookup_tables(self._server(), ids)]

    def _lookup_tables(self, ps: Any, ids: list[Any]) -> list[Any]:
        raise NotImplementedError

    def compute_output_spec(self, ids: Any) -> list[keras.KerasTensor]:
        ids = self._check_ids(ids)
        return [keras.KerasTensor((*i.shape, d), dtype=self.emb_vec_dtype)
                for i, d in zip(ids, self.emb_vec_sizes, strict=True)]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"table_ids": self.table_ids, "emb_vec_sizes": self.emb_vec_sizes})
        return config
