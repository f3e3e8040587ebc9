"""`keras-hps plan hps.json`: the memory each tier needs, per model and table, before deploying.

HPS users had no way to estimate this (HugeCTR issue #427). The numbers follow the data
structures keras-hps allocates:

- GPU, dynamic cache: `max(ceil(gpucacheper x rows), 64)` slots rounded up to whole groups of 32
  slots, each slot holding an 8-byte key, an 8-byte LRU/LFU score, one bit of the LRU marks
  bitmap and the vector (with `gpu_cache_admission: "tinylfu"`, plus a sketch of 4 x 4 bytes
  per slot rounded up to a power of two);
- GPU, static table: every row's vector plus a key/row hash index of 16 bytes per slot, with a
  power of two >= 2 x rows slots (at least 64); no index when the keys are 0..rows-1 on one
  GPU (an identity table, served by a plain gather);
- GPU, uvm: the dynamic cache above, plus the whole table in pinned host RAM;
- GPU workspace: one lookup's keys and vectors, `max_batch_size x
  maxnum_catfeature_query_per_table_per_sample` of them;
- several GPUs (`deployed_device_list`): with `gpu_placement: "replicate"` every GPU holds all of
  the above; with `"shard"` each GPU holds its share of the table: a dynamic cache of
  `ceil(slots / N)` slots rounded up to whole groups of 32, or the static rows of the keys it
  owns (counted by hashing the table's keys as the GPU tier does; the figure is the largest
  share), plus routing buffers for one lookup: per key 24 bytes to group the keys by owner
  (`keras_hps.gpu_shards.ROUTE_BYTES_PER_KEY`), 8 + 3 for the keys and hit flags sent and
  returned, and two rows (one on the owner, one on its way back);
- host RAM tier: `min(rows, overflow_margin)` rows preallocated (vector + 33 bytes of key and
  bookkeeping per row) and the key index (a dense int32 array over the key range when keys are
  compact, else a hash index of 16-byte entries, at least 4 per row);
- cold tier: its in-memory key index (8 bytes per row, 16 when the file is not in key order,
  plus every 64th key for tables of 65,536 rows or more);
- disk: the table file's size.

GPU figures are per device: each device of `deployed_device_list` needs them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from keras_hps.cold_tier import index_nbytes as cold_index_nbytes
from keras_hps.config import PSConfig, load_config
from keras_hps.formats import (
    check_config_tables,
    is_hdf5_path,
    read_hdf5_table,
    read_hps_table,
    table_disk_bytes,
)
from keras_hps.host_tier import ROW_OVERHEAD, index_nbytes

__all__ = ["TablePlan", "add_arguments", "plan_config", "run"]

SLOT_GROUP = 32  # dynamic-cache slots come in groups of 32 (four 8-slot sets)
GPU_SLOT_BYTES = 8 + 8  # dynamic cache slot besides its vector: key, score (+ a mark bit)
MIN_CACHE_SLOTS = 64
MIN_INDEX_SLOTS = 64  # a static table's hash index has at least 64 slots
ROUTE_BYTES_PER_KEY = 24  # keras_hps.gpu_shards.ROUTE_BYTES_PER_KEY (owner, sort, order, keys)


@dataclass(frozen=True)
class TablePlan:
    """Bytes one table needs in each tier; GPU figures per device (in ``shard`` placement, those
    of the device with the largest share)."""

    model: str
    table_id: int
    name: str
    rows: int
    dim: int
    cache_type: str
    gpu_slots: int
    gpu_bytes: int
    gpu_workspace_bytes: int
    pinned_host_bytes: int
    host_rows: int
    host_bytes: int
    cold_index_bytes: int
    disk_bytes: int
    devices: int
    placement: str = "replicate"


def _key_facts(path: str, dim: int) -> tuple[int, int, int, bool]:
    """(rows, min key, max key, keys already sorted) read from the table's keys."""
    if is_hdf5_path(path):
        with read_hdf5_table(path, verify=False) as t:
            n = t.num_rows
            if n == 0:
                return 0, 0, -1, True
            return n, int(t.keys[0]), int(t.keys[n - 1]), True
    with read_hps_table(path, dim, check_duplicates=False) as t:
        n, keys = t.num_rows, t.keys
        if n == 0:
            return 0, 0, -1, True
        lo, hi, is_sorted, prev = None, None, True, None
        step = 1 << 22
        for s in range(0, n, step):
            block = np.asarray(keys[s:s + step])
            lo = int(block.min()) if lo is None else min(lo, int(block.min()))
            hi = int(block.max()) if hi is None else max(hi, int(block.max()))
            if is_sorted:
                is_sorted = (bool(np.all(block[1:] > block[:-1]))
                             and (prev is None or block[0] > prev))
                prev = block[-1]
    return n, lo, hi, is_sorted


def _cache_slots(gpucacheper: float, rows: int, shards: int = 1) -> int:
    """Slots of a dynamic cache, or of each of its ``shards``."""
    slots = max(math.ceil(gpucacheper * rows), MIN_CACHE_SLOTS)
    return -(-slots // (SLOT_GROUP * shards)) * SLOT_GROUP


def _index_slots(rows: int) -> int:
    """Slots of a static table's hash index over ``rows`` keys."""
    return max(MIN_INDEX_SLOTS, 1 << max(0, math.ceil(math.log2(max(1, 2 * rows)))))


def _largest_share(path: str, dim: int, shards: int) -> int:
    """Rows of the shard that owns the most of the table's keys (as the GPU tier splits them)."""
    from keras_hps.formats import open_table
    from keras_hps.triton_kernels.shard_route import np_shard_owner

    counts = np.zeros(shards, np.int64)
    with open_table(path, dim) as t:
        step = 1 << 22
        for s in range(0, t.num_rows, step):
            keys = np.asarray(t.keys[s:s + step], dtype=np.int64)
            counts += np.bincount(np_shard_owner(keys, shards), minlength=shards)
    return int(counts.max())


def plan_config(config: str | os.PathLike | dict | PSConfig) -> list[TablePlan]:
    """One TablePlan per (model, table) of a config."""
    cfg = load_config(config)
    check_config_tables(cfg)
    vdb = cfg.volatile_db
    plans = []
    for m in cfg.models:
        for t in range(m.num_tables):
            path = m.sparse_files[t]
            dim = m.dim(t)
            rows, lo, hi, is_sorted = _key_facts(path, dim)
            vec = 4 * dim
            ctype = m.cache_type
            gpu_slots = gpu = pinned = 0
            shards = len(m.deployed_device_list) if m.gpu_placement == "shard" else 1
            if m.gpucache:
                if ctype == "static":
                    identity = shards == 1 and rows > 0 and lo == 0 and hi == rows - 1
                    share = rows if shards == 1 else _largest_share(path, dim, shards)
                    gpu_slots = 0 if identity else _index_slots(share)
                    gpu = gpu_slots * 16 + share * vec
                else:
                    gpu_slots = _cache_slots(m.gpucacheper, rows, shards)
                    gpu = gpu_slots * (GPU_SLOT_BYTES + vec) + gpu_slots // 8
                    if m.gpu_cache_admission == "tinylfu":  # 4 rows of int32 counters
                        gpu += 4 * 4 << max(10, (gpu_slots - 1).bit_length())
                    if ctype == "uvm":
                        pinned = rows * vec
            workspace = m.max_keys_per_lookup(t) * (8 + vec) if m.gpucache else 0
            if m.gpucache and shards > 1:
                workspace += m.max_keys_per_lookup(t) * (ROUTE_BYTES_PER_KEY + 11 + 2 * vec)
            host_rows = host = 0
            uses_dbs = True  # host and cold tiers sit under every GPU mode (exact misses)
            if uses_dbs:
                host_rows = vdb.host_rows(rows)
            if host_rows:
                host = host_rows * (vec + ROW_OVERHEAD) + index_nbytes(host_rows, (lo, hi, rows))
            cold = cold_index_nbytes(rows, is_sorted) if uses_dbs else 0
            plans.append(TablePlan(
                model=m.model, table_id=t, name=m.table_name(t), rows=rows, dim=dim,
                cache_type=ctype if m.gpucache else "off", gpu_slots=gpu_slots, gpu_bytes=gpu,
                gpu_workspace_bytes=workspace, pinned_host_bytes=pinned, host_rows=host_rows,
                host_bytes=host, cold_index_bytes=cold, disk_bytes=table_disk_bytes(path),
                devices=len(m.deployed_device_list) if m.gpucache else 0,
                placement="shard" if shards > 1 else "replicate"))
    return plans


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def format_plan(plans: list[TablePlan]) -> str:
    """A text table of the plans, with per-model and overall totals."""
    head = ("model", "table", "rows", "dim", "gpu cache", "slots", "GPU MiB/dev",
            "pinned MiB", "host MiB", "cold idx MiB", "disk MiB")
    lines: list[tuple[str, ...]] = []

    def total_row(label: str, ps: list[TablePlan]) -> tuple[str, ...]:
        return (label, "", f"{sum(p.rows for p in ps):,}", "", "", "",
                _mib(sum(p.gpu_bytes + p.gpu_workspace_bytes for p in ps)),
                _mib(sum(p.pinned_host_bytes for p in ps)), _mib(sum(p.host_bytes for p in ps)),
                _mib(sum(p.cold_index_bytes for p in ps)), _mib(sum(p.disk_bytes for p in ps)))

    models: dict[str, list[TablePlan]] = {}
    for p in plans:
        models.setdefault(p.model, []).append(p)
        lines.append((p.model, f"{p.table_id} {p.name}", f"{p.rows:,}", str(p.dim), p.cache_type,
                      f"{p.gpu_slots:,}", _mib(p.gpu_bytes + p.gpu_workspace_bytes),
                      _mib(p.pinned_host_bytes), _mib(p.host_bytes), _mib(p.cold_index_bytes),
                      _mib(p.disk_bytes)))
    for name, ps in models.items():
        lines.append(total_row(f"{name} total", ps))
    lines.append(total_row("all models", plans))
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]

    def fmt(r: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i < 2 or i == 4 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    out = [fmt(head), "  ".join("-" * w for w in widths)]
    out += [fmt(r) for r in lines[: len(plans)]]
    out.append("  ".join("-" * w for w in widths))
    out += [fmt(r) for r in lines[len(plans):]]
    devs = {p.model: (p.devices, p.placement) for p in plans}
    out.append("")
    out.append("GPU MiB/dev includes one lookup's workspace (and, sharded, its routing buffers); "
               "each model's GPU memory is needed on each of its devices: "
               + ", ".join(f"{m} x{d}" + (" (sharded: each device's share)" if pl == "shard"
                                          else "") for m, (d, pl) in devs.items()) + ".")
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `keras-hps plan` arguments."""
    parser.add_argument("config", help="parameter-server config (hps.json)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    """Run `keras-hps plan`: prints the plan, returns 0 (errors raise)."""
    plans = plan_config(args.config)
    if args.json:
        print(json.dumps([asdict(p) for p in plans], indent=2))
    else:
        print(format_plan(plans))
    return 0
