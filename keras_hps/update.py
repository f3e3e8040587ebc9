"""`keras-hps update`: apply new rows to a deployed table, with no running server needed.

```
keras-hps update --config hps.json --model M --table T --npz rows.npz
keras-hps update --config hps.json --model M --table T --table-file new_rows.h5
```

The rows come from an `.npz` with arrays `keys` (integers) and `vectors` (`[n, dim]`), or
from a table file (HPS directory or keras-hps HDF5). They go where the config's servers read
updates (`keras_hps.online_updates`):

- `volatile_db.type: redis_cluster`: written to the table's namespace in the cluster and
  announced on the model's update stream, in batches; every server sharing the cluster drops
  its cached copies within its propagation delay.
- otherwise: appended to the table's durable update log (`<table>.updates`, fsynced, under a
  file lock); every server on the machine serving that table applies it within its poll
  interval (`online_updates.UPDATE_POLL_S`), and a server started later replays it.

Acknowledged = this command returned 0. A key repeated in the input keeps its last row.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from keras_hps.config import ModelConfig, PSConfig, load_config
from keras_hps.errors import InvalidInputError, NotFoundError, TableFormatError
from keras_hps.formats import open_table
from keras_hps.formats.progress import progress_bar
from keras_hps.online_updates import UPDATE_POLL_S
from keras_hps.parameter_server import TableSpec, check_update, table_spec
from keras_hps.update_log import UpdateLog, last_rows, log_path

__all__ = ["UpdateSummary", "add_arguments", "apply_update_rows", "read_rows", "run"]

#: Rows written (and announced) at once.
BATCH_ROWS = 65536


@dataclass(frozen=True)
class UpdateSummary:
    """What one `keras-hps update` did."""

    model: str
    table: str
    rows: int
    where: str

    def __str__(self) -> str:
        return f"updated {self.rows:,} rows of {self.model}/{self.table}: {self.where}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags."""
    parser.add_argument("--config", required=True, help="the servers' hps.json")
    parser.add_argument("--model", required=True, help="the model whose table changes")
    parser.add_argument("--table", required=True,
                        help="the table: its id (0, 1, ...) or its embedding_table_names name")
    rows = parser.add_mutually_exclusive_group(required=True)
    rows.add_argument("--npz", help=".npz file with arrays 'keys' [n] and 'vectors' [n, dim]")
    rows.add_argument("--table-file",
                      help="a table (HPS directory or .h5) whose rows are the new rows")
    parser.add_argument("--batch-rows", type=int, default=BATCH_ROWS,
                        help="rows written and announced at once")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar (default: when writing over 1M rows)")


def _table_id(m: ModelConfig, table: str) -> int:
    if table.isdigit():
        return m.check_table_id(int(table))
    names = list(m.embedding_table_names)
    if table not in names:
        raise NotFoundError(f"model {m.model!r} has no table {table!r}; tables: {names} "
                            f"(or ids 0..{m.num_tables - 1})")
    return names.index(table)


def read_rows(npz: str | None = None, table_file: str | None = None,
              dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keys, vectors) of an `.npz` (arrays `keys`, `vectors`) or of a table file."""
    if table_file is not None:
        with open_table(table_file, dim) as t:
            return np.asarray(t.keys[:], np.int64), np.asarray(t.vectors[:], np.float32)
    assert npz is not None
    try:
        with np.load(npz, allow_pickle=False) as f:
            missing = [a for a in ("keys", "vectors") if a not in f.files]
            if missing:
                raise TableFormatError(f"{npz}: no array {missing[0]!r} (it has {f.files}); "
                                       "write it with np.savez(path, keys=..., vectors=...)")
            return f["keys"], f["vectors"]
    except (ValueError, OSError) as e:
        if isinstance(e, (TableFormatError, FileNotFoundError)):
            raise
        raise TableFormatError(f"{npz}: not a readable .npz file: {e}") from None


def apply_update_rows(config: PSConfig, spec: TableSpec, keys: np.ndarray,
                      vectors: np.ndarray, *, batch_rows: int = BATCH_ROWS,
                      progress: bool | None = None) -> UpdateSummary:
    """Write checked rows of table `spec` where the servers of `config` read updates."""
    keys, vectors = check_update(spec, keys, vectors)
    n = len(keys)
    show = progress if progress is not None else n > 1_000_000
    bar = progress_bar(show, n, f"update {spec.model}/{spec.name}")
    try:
        if config.volatile_db.redis:
            where = _to_redis(config, spec, keys, vectors, batch_rows, bar)
        else:
            where = _to_log(spec, keys, vectors, batch_rows, bar)
    finally:
        if bar is not None:
            bar.close()
    return UpdateSummary(spec.model, spec.name, n, where)


def _to_redis(config: PSConfig, spec: TableSpec, keys: np.ndarray, vectors: np.ndarray,
              batch_rows: int, bar: Any) -> str:
    from keras_hps.redis_tier import (
        RedisClusterTier,
        connect_cluster,
        redis_cluster_settings,
        table_content_id,
    )
    from keras_hps.update_stream import UpdatePublisher

    settings = redis_cluster_settings(config.volatile_db)
    client = connect_cluster(settings)
    try:
        tier = RedisClusterTier(settings, model=spec.model, table=spec.name,
                                version=table_content_id(spec.path, spec.dim), dim=spec.dim,
                                client=client)
        publisher = UpdatePublisher(client, spec.model)
        for start in range(0, len(keys), batch_rows):
            k, v = last_rows(keys[start:start + batch_rows], vectors[start:start + batch_rows])
            tier.update(k, v)
            publisher.publish(spec.table_id, tier.namespace, k, v)
            if bar is not None:
                bar.update(min(batch_rows, len(keys) - start))
        tier.close()
    finally:
        client.close()
    return (f"written to the Redis Cluster at {','.join(settings.address)} and announced on "
            f"the update stream of model {spec.model!r}")


def _to_log(spec: TableSpec, keys: np.ndarray, vectors: np.ndarray, batch_rows: int,
            bar: Any) -> str:
    path = log_path(spec.path)
    with UpdateLog(path, spec.dim) as log:
        for start in range(0, len(keys), batch_rows):
            log.append(keys[start:start + batch_rows], vectors[start:start + batch_rows])
            if bar is not None:
                bar.update(min(batch_rows, len(keys) - start))
    return (f"appended to {os.path.normpath(path)} (fsynced); servers on this machine apply "
            f"it within {UPDATE_POLL_S:g} s")


def run(args: argparse.Namespace) -> int:
    """Apply the rows and print what was done."""
    if args.batch_rows < 1:
        raise InvalidInputError(f"--batch-rows must be >= 1, got {args.batch_rows}")
    config = load_config(args.config)
    m = config.model(args.model)
    t = _table_id(m, args.table)
    path = m.sparse_files[t]
    if not os.path.exists(path):
        raise TableFormatError(f"{args.config}: table not found: {path}")
    spec = table_spec(config, m, t)
    keys, vectors = read_rows(args.npz, args.table_file, spec.dim if args.table_file else None)
    print(apply_update_rows(config, spec, keys, vectors, batch_rows=args.batch_rows,
                            progress=args.progress), flush=True)
    return 0
