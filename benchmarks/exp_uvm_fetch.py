"""Experiment: how `StaticTable.fetch` (uvm misses) spends its time on a table larger than the
GPU cache's reach, and which settings move the most rows per second (GPU machine).

A ``--rows`` x ``--dim`` float32 table in pinned host memory (huge pages where allowed),
``--misses`` distinct random rows per fetch (the whole-hierarchy benchmark's misses are
tail keys, spread over the table like these), keys sorted as ``torch.unique`` leaves them.
Timed beside each other, round-robin, each call synchronised:

- ``fetch``: the shipped path for each (copy chunk MiB, zero-copy share) of the grid;
- ``host gather``: ``torch.index_select`` of the same rows into one pinned buffer, at
  once and in copy-chunk pieces (the host threads' share of the work alone);
- ``copy engine``: one pinned buffer of those rows to the device (the bus alone);
- ``zero-copy``: all rows read over the bus by the kernel, through the hash query that
  ``fetch`` uses for its zero-copy share, or by a plain row gather of the known row
  positions (``_gather_kernel`` on the pinned table), per launch setting;
- ``split, row gather``: ``fetch`` with its zero-copy share read by that row gather.

Usage (GPU machine, repository root): ``source benchmarks/device_env.sh;
python3 benchmarks/exp_uvm_fetch.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import triton

from keras_hps.triton_kernels.cache_layout import block_d
from keras_hps.triton_kernels.gather import _gather_kernel
from keras_hps.triton_kernels.static_table import StaticTable, pinned_empty, static_find


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--misses", type=int, default=115_000)
    p.add_argument("--chunks-mib", default="4,8,16,32")
    p.add_argument("--shares", default="0.2,0.3,0.4,0.5")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--gather-launch", default="8x4,16x4,32x4,16x8,32x8,64x8",
                   help="row-gather launch settings: rows per program x warps")
    p.add_argument("--json", default="")
    args = p.parse_args()
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    hv = pinned_empty((args.rows, args.dim))
    hv.zero_()
    hv.view(torch.int32)[:, 0] = torch.arange(args.rows, dtype=torch.int32)  # row id
    keys = torch.arange(args.rows, dtype=torch.int64) * 3 + 1
    table = StaticTable(keys, hv, device=dev, n_device=0)
    print(f"table {args.rows:,} x {args.dim} pinned, index built: "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    batches = []
    for _ in range(4):
        rows = torch.randperm(args.rows, device=dev, generator=gen)[:args.misses]
        batches.append(torch.sort(rows * 3 + 1).values)
    out, hit = table.fetch(batches[0])
    want = ((batches[0] - 1) // 3).to(torch.int32)
    assert bool(hit.all()) and torch.equal(out.view(torch.int32)[:, 0], want)
    rows_h = [((b - 1) // 3).cpu() for b in batches]
    big = torch.empty((args.misses, args.dim), pin_memory=True)
    dst = torch.empty((args.misses, args.dim), device=dev)
    calls = [0]

    def batch() -> int:
        calls[0] += 1
        return calls[0] % len(batches)

    def fetch_with(chunk_mib: int, share: float):
        def run() -> None:
            table.copy_chunk_bytes, table.zero_copy_share = chunk_mib << 20, share
            table.fetch(batches[batch()])
        return run

    variants = {f"fetch chunk={c}MiB share={s}": fetch_with(c, s)
                for c in (int(x) for x in args.chunks_mib.split(","))
                for s in (float(x) for x in args.shares.split(","))}
    rows_d = [((b - 1) // 3) for b in batches]

    def gather_with(bk: int, nw: int, share: float = 1.0, split: bool = False):
        def run() -> None:
            i = batch()
            if split:  # as fetch: find the rows, read them back, split the work
                rows = static_find(table.index, batches[i])
                rh = rows.cpu()
            else:
                rows, rh = rows_d[i], rows_h[i]
            k = int(rows.numel() * share)
            if k:
                _gather_kernel[(triton.cdiv(k, bk),)](rows, k, hv, dst, DIM=args.dim,
                                                      BLOCK_D=block_d(args.dim), BLOCK_K=bk,
                                                      ROW_EVICT="", num_warps=nw)
            if split and k < rows.numel():
                table._copy_host_rows(rh[k:], dst[k:])
        return run

    for spec in args.gather_launch.split(","):
        bk, nw = (int(x) for x in spec.split("x"))
        variants[f"zero-copy row gather {bk}x{nw}"] = gather_with(bk, nw)
    variants["zero-copy hash query (fetch's share)"] = lambda: table.query(batches[batch()])
    for s in (float(x) for x in args.shares.split(",")):
        variants[f"split, row gather 16x4, share={s}"] = gather_with(16, 4, s, split=True)
    variants["host gather, all rows at once"] = (
        lambda: torch.index_select(hv, 0, rows_h[batch()], out=big))
    variants["copy engine, one pinned buffer"] = lambda: dst.copy_(big, non_blocking=True)
    n = args.misses  # the row gather reads the pinned table right
    _gather_kernel[(triton.cdiv(n, 16),)](rows_d[0], n, hv, dst, DIM=args.dim,
                                          BLOCK_D=block_d(args.dim), BLOCK_K=16, ROW_EVICT="",
                                          num_warps=4)
    assert torch.equal(dst.view(torch.int32)[:, 0], rows_d[0].to(torch.int32))
    times = {k: [] for k in variants}
    for fn in variants.values():  # warm-up: kernels compiled, staging rings made
        fn()
    for _ in range(args.rounds):
        for k, fn in variants.items():
            times[k] += timed(fn, 1)
    mb = args.misses * args.dim * 4 / 1e6
    res = []
    print(f"{args.misses:,} rows of {args.dim * 4} B = {mb:.1f} MB per call; "
          f"median of {args.rounds} round-robin calls")
    for k, v in times.items():
        med = statistics.median(v)
        res.append({"variant": k, "ms_median": round(med, 3), "GBps": round(mb / med, 1)})
        print(f"  {k:<40} {med:7.3f} ms  {mb / med:6.1f} GB/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"misses": args.misses, "rows": args.rows, "results": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
