"""Hit rate of set-associative cache policies on the hierarchy's Zipf workload (CPU, NumPy).

A model of what the GPU cache would keep, to weigh the query's recency update (it costs the
query 6-15 points against the gather: docs/benchmarks/gpu_cache.md, "Layout study") against
the hit rate it buys. The workload is the whole-hierarchy benchmark's, scaled down: Zipf
keys over ``--keys`` ids, a cache of ``--cache-share`` of them, batches of ``--batch`` draws;
every batch is looked up (unique keys), then its misses are inserted, as ``ps.lookup`` does.
The hit rate is over unique keys, after ``--warmup`` batches.

Policies (victim: an empty slot, else the lowest score in the set):

- ``lru``: a hit writes the batch's stamp into the slot's score (what the cache does now).
- ``nru``: a hit sets a bit; an insert into a set first stamps the set's marked slots with the
  current batch and clears their bits, then picks the lowest score (a bitmap touch).
- ``fifo``: no recency update; the score is the insert stamp (a read-only query).
- ``lfu``: a hit adds one; a new key starts at one.
- ``tinylfu``: ``lru`` eviction, plus admission by frequency (TinyLFU): every key's lookups
  are counted (halved every ``--age`` lookups of the cache's size, as a sketch would age), and a
  missed key enters a full set only if it was looked up more often than the slot it would
  evict. It counts each key once per batch (the parameter server made a batch's keys unique
  before the cache saw them).
- ``tinylfu_all``: as ``tinylfu``, but every draw is counted, a key repeated in a batch
  each time (the parameter server now probes every key where it stands, and the sketch
  counts each probe).

Usage: ``python benchmarks/sim_cache_policy.py`` (about a minute).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

EMPTY = -1


def zipf_cdf(n: int, alpha: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** alpha
    c = np.cumsum(w)
    return c / c[-1]


def simulate(policy: str, ways: int, keys: int, slots: int, batches: list[np.ndarray],
             warmup: int, set_of: np.ndarray, age: float = 10.0) -> float:
    """Unique-key hit rate after ``warmup`` batches."""
    num_sets = slots // ways
    table = np.full((num_sets, ways), EMPTY, dtype=np.int64)
    score = np.zeros((num_sets, ways), dtype=np.int64)
    mark = np.zeros((num_sets, ways), dtype=bool)
    where = np.full(keys, -1, dtype=np.int64)  # key -> flat slot, -1 if absent
    freq = np.zeros(keys, dtype=np.int32) if policy.startswith("tinylfu") else None
    counted = 0
    hits = total = 0
    for t, batch in enumerate(batches, start=1):
        u = np.unique(batch)
        if freq is not None:
            if policy == "tinylfu_all":
                freq += np.bincount(batch, minlength=keys).astype(np.int32)
                counted += batch.size
            else:
                freq[u] += 1
                counted += u.size
            if counted > age * slots:
                freq >>= 1
                counted = 0
        pos = where[u]
        hit = pos >= 0
        if t > warmup:
            hits += int(hit.sum())
            total += u.size
        hp = pos[hit]
        if policy in ("lru", "tinylfu", "tinylfu_all"):
            score.reshape(-1)[hp] = t
        elif policy == "nru":
            mark.reshape(-1)[hp] = True
        elif policy == "lfu":
            score.reshape(-1)[hp] += 1
        miss = u[~hit]
        if not miss.size:
            continue
        s = set_of[miss]
        order = np.argsort(s, kind="stable")
        miss, s = miss[order], s[order]
        first = np.searchsorted(s, s, side="left")
        rank = np.arange(s.size) - first
        sets = np.unique(s)
        if policy == "nru":
            m = mark[sets]
            sc = score[sets]
            sc[m] = t - 1
            score[sets] = sc
            mark[sets] = False
        # Victims: empty slots first, then lowest score, per set.
        sc = np.where(table[sets] == EMPTY, np.iinfo(np.int64).min, score[sets])
        victims = np.argsort(sc, axis=1, kind="stable")
        row = np.searchsorted(sets, s)
        ok = rank < ways
        row, miss, s, rank = row[ok], miss[ok], s[ok], rank[ok]
        way = victims[row, rank]
        old = table[s, way]
        if freq is not None:  # admit only keys more frequent than their victim
            admit = (old == EMPTY) | (freq[miss] > freq[np.where(old == EMPTY, 0, old)])
            miss, s, way, old = miss[admit], s[admit], way[admit], old[admit]
        where[old[old != EMPTY]] = -1
        table[s, way] = miss
        where[miss] = s * ways + way
        score[s, way] = 1 if policy == "lfu" else t
    return hits / max(total, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--keys", type=int, default=10_000_000)
    p.add_argument("--cache-share", type=float, default=0.10)
    p.add_argument("--batch", type=int, default=100_000)
    p.add_argument("--alpha", type=float, default=1.05)
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--warmup", type=int, default=250)
    p.add_argument("--policies", default="lru,nru,fifo,lfu,tinylfu")
    p.add_argument("--age", type=float, default=10.0)
    p.add_argument("--ways", default="8,32")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    cdf = zipf_cdf(args.keys, args.alpha)
    perm = rng.permutation(args.keys)  # popularity rank -> key id
    batches = [perm[np.searchsorted(cdf, rng.random(args.batch))] for _ in range(args.batches)]
    slots = int(args.keys * args.cache_share)
    # The best fixed cache for this stream: the `slots` keys of highest Zipf probability.
    in_top = np.zeros(args.keys, dtype=bool)
    in_top[perm[:slots]] = True
    oracle = np.mean([in_top[np.unique(b)].mean() for b in batches[args.warmup:]])
    uniq = np.mean([np.unique(b).size for b in batches[:20]])
    print(f"Zipf({args.alpha}) over {args.keys:,} keys, cache {slots:,} slots, batch "
          f"{args.batch:,} draws (~{uniq:,.0f} unique), {args.batches} batches "
          f"({args.warmup} warm-up)")
    print(f"static oracle (the {slots:,} most probable keys resident): {100 * oracle:.1f}%")
    print("| policy | ways | hit rate (unique keys) |\n|---|---|---|")
    for ways in (int(w) for w in args.ways.split(",")):
        set_of = rng.integers(0, slots // ways, args.keys)
        for policy in args.policies.split(","):
            t0 = time.time()
            hr = simulate(policy, ways, args.keys, slots, batches, args.warmup, set_of, args.age)
            print(f"| {policy} | {ways} | {100 * hr:.1f}% |  ({time.time() - t0:.0f} s)",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
