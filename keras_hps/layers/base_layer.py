"""What both lookup layers share: arguments, backend check, parameter-server binding, table checks.

A layer names a table (`model_name`, `table_id`) of the process's parameter server. It holds no
weights: every call reads the table through `ParameterServer.lookup`. The server is the one
installed by `keras_hps.init(...)`, or, when the layer was given `ps_config_file`, the one that
file initialises on first use (once per process, as HPS's implicit init).
"""

from __future__ import annotations

import threading
from typing import Any

import keras

from keras_hps.errors import ConfigError, InvalidInputError

SUPPORTED_BACKENDS = ("tensorflow", "torch")
# Guards every layer's (parameter server, table spec) binding; module-level so that
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


class TableBinding:
    """A parameter server and the checked spec of one of its tables."""

    __slots__ = ("ps", "spec")

    def __init__(self, ps: Any, spec: Any) -> None:
        self.ps = ps
        self.spec = spec


class TableLookupLayer(keras.layers.Layer):
    """Base of `LookupLayer` and `SparseLookupLayer`: a non-trainable view of one table.

    Args:
        model_name: the model's `"model"` entry in the parameter-server config.
        table_id: index of the table in that model's `sparse_files`.
        emb_vec_size: the table's vector size; must equal `embedding_vecsize_per_table`.
        emb_vec_dtype: dtype of the output vectors (tables are float32; other float dtypes
            are cast from it).
        ps_config_file: path of an `hps.json`; when given, the first build or call
            initialises the process's parameter server from it if none is running.
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
        backend = keras.backend.backend()
        if backend not in SUPPORTED_BACKENDS:
            raise RuntimeError(
                f"{type(self).__name__} supports the Keras backends {SUPPORTED_BACKENDS}; "
                f"the current backend is {backend!r}. Set KERAS_BACKEND=tensorflow or torch."
            )
        if not isinstance(model_name, str) or not model_name:
            raise ConfigError(f"model_name must be a non-empty string, got {model_name!r}")
        if isinstance(table_id, bool) or not isinstance(table_id, int) or table_id < 0:
            raise ConfigError(f"table_id must be a non-negative int, got {table_id!r}")
        if isinstance(emb_vec_size, bool) or not isinstance(emb_vec_size, int) or emb_vec_size < 1:
            raise ConfigError(f"emb_vec_size must be a positive int, got {emb_vec_size!r}")
        dtype = keras.backend.standardize_dtype(emb_vec_dtype)
        if "float" not in dtype:
            raise ConfigError(f"emb_vec_dtype must be a float dtype, got {emb_vec_dtype!r}")
        if global_batch_size is not None and (
            isinstance(global_batch_size, bool)
            or not isinstance(global_batch_size, int)
            or global_batch_size < 1
        ):
            raise ConfigError(
                f"global_batch_size must be a positive int or None, got {global_batch_size!r}"
            )
        kwargs.setdefault("dtype", dtype)
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.model_name = model_name
        self.table_id = table_id
        self.emb_vec_size = emb_vec_size
        self.emb_vec_dtype = dtype
        self.ps_config_file = None if ps_config_file is None else str(ps_config_file)
        self.global_batch_size = global_batch_size
        # Lookups cross into Python (TF) or call Triton from Python (torch): no XLA.
        self.supports_jit = False
        self._binding: TableBinding | None = None

    # -- parameter server -------------------------------------------------------------

    def _where(self) -> str:
        return f"layer {self.name!r} (model {self.model_name!r}, table {self.table_id})"

    def _parameter_server(self) -> Any:
        """The process's parameter server, initialised from `ps_config_file` if needed."""
        from keras_hps import parameter_server

        try:
            return parameter_server.ensure_parameter_server(self.ps_config_file)
        except RuntimeError as err:
            raise RuntimeError(f"{self._where()}: {err}") from err

    def _table(self) -> TableBinding:
        """The current parameter server and this layer's checked table spec."""
        ps = self._parameter_server()
        binding = self._binding
        if binding is not None and binding.ps is ps:
            return binding
        with _BINDING_LOCK:
            spec = ps.table_spec(self.model_name, self.table_id)
            if spec.dim != self.emb_vec_size:
                raise ConfigError(
                    f"{self._where()}: emb_vec_size={self.emb_vec_size} but the parameter "
                    f"server's config gives embedding_vecsize_per_table {spec.dim}"
                )
            max_batch = ps.config.model(self.model_name).max_batch_size
            if self.global_batch_size is not None and self.global_batch_size > max_batch:
                raise ConfigError(
                    f"{self._where()}: global_batch_size={self.global_batch_size} exceeds "
                    f"the model's max_batch_size {max_batch}"
                )
            self._binding = TableBinding(ps, spec)
            return self._binding

    def _has_parameter_server(self) -> bool:
        if self.ps_config_file is not None:
            return True
        from keras_hps import parameter_server

        try:
            parameter_server.get_parameter_server()
        except RuntimeError:
            return False
        return True

    def build(self, input_shape: Any = None) -> None:
        """Check the table against the parameter server when one is reachable now.

        Without `ps_config_file` and before `keras_hps.init`, the check waits for the
        first call, so a model can be built (and saved) on a machine without the tables.
        """
        if self._has_parameter_server():
            self._table()
        self.built = True

    # -- per-lookup work (runs at execution time, in Python) ---------------------------

    def _check_key_count(self, count: int, spec: Any) -> None:
        max_keys = spec.max_keys_per_lookup
        if count > max_keys:
            raise InvalidInputError(
                f"{self._where()}: {count} keys in one lookup exceed the configured maximum "
                f"{max_keys} (max_batch_size x maxnum_catfeature_query_per_table_per_sample)"
            )

    def lookup_keys(self, keys: Any) -> Any:
        """Vectors for `keys` (NumPy array or torch tensor) from the parameter server."""
        binding = self._table()
        count = keys.numel() if hasattr(keys, "numel") else keys.size
        self._check_key_count(int(count), binding.spec)
        return binding.ps.lookup(self.model_name, self.table_id, keys)

    # -- shared checks and serialization ------------------------------------------------

    def _check_id_dtype(self, dtype: Any, what: str = "ids") -> None:
        name = keras.backend.standardize_dtype(dtype)
        if name not in ID_DTYPES:
            raise InvalidInputError(
                f"{self._where()}: {what} must be int32 or int64, got {name}"
            )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "model_name": self.model_name,
                "table_id": self.table_id,
                "emb_vec_size": self.emb_vec_size,
                "emb_vec_dtype": self.emb_vec_dtype,
                "ps_config_file": self.ps_config_file,
                "global_batch_size": self.global_batch_size,
            }
        )
        return config
