"""Cache kernels (query, insert, invalidate/update, fused, gather) against their NumPy references.

Runs under TRITON_INTERPRET=1 on CPU torch tensors (CI) and unchanged on a CUDA device, where
the sizes grow (GPU_SCALE). Every case draws fresh random keys and rows, and compares the whole
cache state (keys, scores, LRU marks, rows) after each operation, not just the outputs.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from keras_hps.triton_kernels.cache_admission import (  # noqa: E402
    new_sketch,
    np_sketch_add,
    np_sketch_estimate,
    sketch_add,
)
from keras_hps.triton_kernels.cache_fused_query import (  # noqa: E402
    cache_params,
    fused_cache_query,
    np_fused_cache_query,
)
from keras_hps.triton_kernels.cache_insert import cache_insert, np_cache_insert  # noqa: E402
from keras_hps.triton_kernels.cache_layout import (  # noqa: E402
    LFU_CAP,
    SLOTS_PER_SET,
    CacheArrays,
    allocate,
    empty_key,
    np_set_index,
    num_sets_for,
)
from keras_hps.triton_kernels.cache_query import cache_query, np_cache_query  # noqa: E402
from keras_hps.triton_kernels.cache_update import (  # noqa: E402
    cache_invalidate,
    cache_update,
    np_cache_invalidate,
    np_cache_update,
)
from keras_hps.triton_kernels.gather import gather, np_gather  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU_SCALE = 16 if DEVICE == "cuda" else 1


@pytest.fixture
def rng(request) -> np.random.Generator:
    seed = np.random.SeedSequence().entropy
    request.node.user_properties.append(("seed", seed))  # reported on failure
    return np.random.default_rng(seed)


def assert_same_state(arrays: CacheArrays, ref) -> None:
    got = arrays.to_numpy()
    for field in ("keys", "scores", "marks", "vectors"):
        np.testing.assert_array_equal(getattr(got, field), getattr(ref, field), err_msg=field)


def t(keys: np.ndarray, dtype=torch.int64) -> torch.Tensor:
    return torch.tensor(np.asarray(keys), dtype=dtype, device=DEVICE)


def f32(values: np.ndarray) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=DEVICE)


def key_range(dtype) -> tuple[int, int]:
    """A key range that includes negatives and the dtype's extremes but not the sentinel."""
    info = torch.iinfo(dtype)
    return info.min, info.max  # high is exclusive for rng.integers: sentinel excluded


def draw_keys(rng, n, pool) -> np.ndarray:
    """``n`` keys drawn with repetition from ``pool``: duplicates within a batch are likely."""
    return rng.choice(pool, size=n, replace=True)


@pytest.mark.parametrize(
    "dim,policy,key_dtype",
    [(1, "lru", torch.int64), (16, "lfu", torch.int32), (100, "lru", torch.int32),
     (128, "lfu", torch.int64)],
)
def test_insert_and_query_follow_reference(rng, dim, policy, key_dtype):
    # 12 sets of 8 slots and a key pool of ~3x the capacity: sets fill, evict, and batches
    # carry duplicates, hits and misses.
    num_sets = 12 * GPU_SCALE
    arrays = allocate(num_sets, dim, key_dtype, DEVICE)
    ref = arrays.to_numpy()
    lo, hi = key_range(key_dtype)
    pool = np.concatenate([rng.integers(lo, hi, size=num_sets * SLOTS_PER_SET * 3),
                           [lo, hi - 1, 0, -1]])
    n = 48 * GPU_SCALE
    for rnd in range(3):
        keys = draw_keys(rng, n, pool)
        vals = rng.standard_normal((n, dim)).astype(np.float32)
        counters = torch.zeros(4, dtype=torch.int64, device=DEVICE)
        cache_insert(arrays, t(keys, key_dtype), f32(vals), policy=policy, stamp=2 * rnd + 1,
                     counters=counters)
        ins, ev = np_cache_insert(ref, keys, vals, policy=policy, stamp=2 * rnd + 1)
        assert_same_state(arrays, ref)
        assert counters[2:].tolist() == [ins, ev]

        q = draw_keys(rng, n, pool)
        out, hit = cache_query(arrays, t(q, key_dtype), policy=policy,
                               counters=counters)
        ref_out, ref_hit = np_cache_query(ref, q, policy=policy)
        np.testing.assert_array_equal(hit.cpu().numpy(), ref_hit)
        np.testing.assert_array_equal(out.cpu().numpy(), ref_out)
        assert_same_state(arrays, ref)  # hits recorded the same way (marks / counts)
        assert counters[:2].tolist() == [int(ref_hit.sum()), int((~ref_hit).sum())]
    assert 0 < ref_hit.sum() < n  # the case really mixes hits and misses
    assert ev > 0  # and really evicts


def test_full_set_eviction_picks_lru_and_lfu_victims(rng):
    # One set (four sets, keys drawn into set 0): fill its 8 slots, then make key C least
    # frequently used but recently used, and key D least recently used but more frequently
    # used than C. The insert at stamp 4 turns the hits marked so far into stamps.
    victims = {}
    for policy in ("lru", "lfu"):
        arrays = allocate(4, 4, torch.int64, DEVICE)
        ref = arrays.to_numpy()
        keys = _same_set_keys(rng, 4, 9, which=0)
        resident, newcomer = keys[:8], keys[8:]
        c, d = resident[2], resident[5]
        others = resident[(resident != c) & (resident != d)]
        steps = [("insert", resident, 1), ("query", resident[resident != c], 2),
                 ("query", resident[resident != c], 3), ("insert", others[:1], 4),
                 ("query", np.array([c]), 5), ("query", others, 6), ("insert", newcomer, 7)]
        for op, ks, stamp in steps:
            if op == "insert":
                vals = rng.standard_normal((ks.size, 4)).astype(np.float32)
                cache_insert(arrays, t(ks), f32(vals), policy=policy, stamp=stamp)
                np_cache_insert(ref, ks, vals, policy=policy, stamp=stamp)
            else:
                cache_query(arrays, t(ks), policy=policy)
                np_cache_query(ref, ks, policy=policy)
            assert_same_state(arrays, ref)
        stored = set(arrays.keys.cpu().tolist())
        assert newcomer[0] in stored
        (victims[policy],) = set(resident.tolist()) - stored
        expected = d if policy == "lru" else c
        assert victims[policy] == expected
    assert victims["lru"] != victims["lfu"]


def test_lru_marks_become_the_next_inserts_stamp(rng):
    # Hits only set marks; the next insert into the set stamps exactly the marked slots.
    arrays = allocate(4, 2, torch.int64, DEVICE)
    keys = _same_set_keys(rng, 4, 8, which=3)
    cache_insert(arrays, t(keys[:6]), f32(np.zeros((6, 2))), stamp=1)
    cache_query(arrays, t(keys[[1, 4, 1]]))
    st = arrays.to_numpy()
    slots = [st.find(k) for k in keys[:6]]
    assert st.marks[slots].tolist() == [False, True, False, False, True, False]
    assert (st.scores[slots] == 1).all()
    cache_insert(arrays, t(keys[6:7]), f32(np.ones((1, 2))), stamp=9)
    st = arrays.to_numpy()
    assert not st.marks.any()
    assert st.scores[slots].tolist() == [1, 9, 1, 1, 9, 1]
    assert st.scores[st.find(keys[6])] == 9


def test_lfu_counts_stop_at_the_cap(rng):
    # Query hits add to an LFU count only below LFU_CAP (hot keys then cost a read, not a
    # contended atomic); the reference stops at the same place.
    arrays = allocate(4, 2, torch.int64, DEVICE)
    keys = _same_set_keys(rng, 4, 3, which=1)
    cache_insert(arrays, t(keys), f32(np.zeros((3, 2))), policy="lfu", stamp=1)
    ref = arrays.to_numpy()
    hot = ref.find(keys[0])
    cap = LFU_CAP.value
    arrays.scores[hot] = cap - 2
    ref.scores[hot] = cap - 2
    for _ in range(4):  # one hit per call: cap - 1, cap, cap, cap
        cache_query(arrays, t(keys[:2]), policy="lfu")
        np_cache_query(ref, keys[:2], policy="lfu")
        np.testing.assert_array_equal(arrays.to_numpy().scores, ref.scores)
    assert ref.scores[hot] == cap and ref.scores[ref.find(keys[1])] == 5


def test_more_keys_than_slots_into_one_set(rng):
    arrays = allocate(4, 3, torch.int64, DEVICE)
    ref = arrays.to_numpy()
    keys = _same_set_keys(rng, 4, 13, which=1)
    vals = rng.standard_normal((13, 3)).astype(np.float32)
    counters = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    cache_insert(arrays, t(keys), f32(vals), stamp=1, counters=counters)
    ins, ev = np_cache_insert(ref, keys, vals, stamp=1)
    assert_same_state(arrays, ref)
    assert (ins, ev) == (13, 5) and counters[2:].tolist() == [13, 5]


def test_duplicates_in_one_insert_keep_one_copy_with_last_value(rng):
    arrays = allocate(4, 8, torch.int64, DEVICE)
    keys = np.array([7, 9, 7, 7, 11, 9])
    vals = rng.standard_normal((6, 8)).astype(np.float32)
    cache_insert(arrays, t(keys), f32(vals), stamp=1)
    stored = arrays.keys.cpu().numpy()
    assert sorted(stored[stored != empty_key(torch.int64)].tolist()) == [7, 9, 11]
    out, hit = cache_query(arrays, t([7, 9, 11]), touch=False)
    assert hit.all()
    np.testing.assert_array_equal(out.cpu().numpy(), vals[[3, 5, 4]])
    # Present keys are updated in place: no second copy, new row.
    new = rng.standard_normal((1, 8)).astype(np.float32)
    cache_insert(arrays, t([9]), f32(new), stamp=2)
    stored2 = arrays.keys.cpu().numpy()
    np.testing.assert_array_equal(stored2, stored)
    np.testing.assert_array_equal(cache_query(arrays, t([9]))[0].cpu().numpy(), new)


def test_invalidate_and_update_follow_reference(rng):
    dim = 16
    arrays = allocate(4, dim, torch.int64, DEVICE)
    ref = arrays.to_numpy()
    pool = rng.integers(-(2**62), 2**62, size=200)
    keys = draw_keys(rng, 100, pool)
    vals = rng.standard_normal((100, dim)).astype(np.float32)
    cache_insert(arrays, t(keys), f32(vals), stamp=1)
    np_cache_insert(ref, keys, vals, stamp=1)
    gone = draw_keys(rng, 40, pool)  # present and absent keys, with repeats
    cache_invalidate(arrays, t(gone))
    np_cache_invalidate(ref, gone)
    assert_same_state(arrays, ref)
    out, hit = cache_query(arrays, t(gone), touch=False)
    assert not hit.any() and not out.any()  # an invalidated key is never served
    upd = draw_keys(rng, 60, pool)
    uvals = rng.standard_normal((60, dim)).astype(np.float32)
    cache_update(arrays, t(upd), f32(uvals))
    np_cache_update(ref, upd, uvals)
    assert_same_state(arrays, ref)
    # After an update, a query never returns the old row of an updated key.
    present = [k for k in dict.fromkeys(upd.tolist()) if ref.find(k) >= 0]
    last = {k: uvals[i] for i, k in enumerate(upd.tolist())}
    out, hit = cache_query(arrays, t(present), touch=False)
    assert hit.all()
    np.testing.assert_array_equal(out.cpu().numpy(), np.stack([last[k] for k in present]))
    # Reinserting after invalidation works.
    cache_insert(arrays, t(gone[:5]), f32(vals[:5]), stamp=3)
    np_cache_insert(ref, gone[:5], vals[:5], stamp=3)
    assert_same_state(arrays, ref)


def test_int32_cache_range_and_sentinel_errors():
    a32 = allocate(4, 2, torch.int32, DEVICE)
    with pytest.raises(ValueError, match="2147483647"):
        cache_query(a32, t([1, 2**31 - 1], torch.int32))
    with pytest.raises(ValueError, match="does not fit"):
        cache_query(a32, t([1, 2**31]))
    with pytest.raises(ValueError, match="does not fit"):
        cache_insert(a32, t([-(2**31) - 1]), f32(np.zeros((1, 2))))
    a64 = allocate(4, 2, torch.int64, DEVICE)
    with pytest.raises(ValueError, match="reserved as the empty-slot sentinel"):
        cache_insert(a64, t([3, 2**63 - 1]), f32(np.zeros((2, 2))))
    with pytest.raises(ValueError, match="reserved"):
        cache_invalidate(a64, t([2**63 - 1]))
    with pytest.raises(ValueError, match="int32 or int64"):
        cache_query(a64, torch.tensor([1.0], device=DEVICE))
    with pytest.raises(ValueError, match="shape"):
        cache_insert(a64, t([1, 2]), f32(np.zeros((2, 3))))
    # int32 keys into an int64 cache are widened, int64 keys fitting int32 are accepted.
    cache_insert(a64, t([-5], torch.int32), f32(np.ones((1, 2))), stamp=1)
    assert cache_query(a64, t([-5]))[1].item()
    cache_insert(a32, t([-5]), f32(np.ones((1, 2))), stamp=1)
    assert cache_query(a32, t([-5], torch.int32))[1].item()


def test_empty_batches_do_nothing(rng):
    arrays = allocate(4, 100, torch.int64, DEVICE)
    keys = rng.integers(0, 1000, size=20)
    cache_insert(arrays, t(keys), f32(rng.standard_normal((20, 100))), stamp=1)
    before = arrays.to_numpy()
    empty = t(np.zeros(0, dtype=np.int64))
    out, hit = cache_query(arrays, empty)
    assert out.shape == (0, 100) and hit.shape == (0,)
    cache_insert(arrays, empty, f32(np.zeros((0, 100))), stamp=5)
    cache_update(arrays, empty, f32(np.zeros((0, 100))))
    cache_invalidate(arrays, empty)
    assert_same_state(arrays, before)
    assert gather(arrays.vectors, empty).shape == (0, 100)


def test_query_reports_compact_miss_positions(rng):
    arrays = allocate(8, 4, torch.int64, DEVICE)
    keys = rng.integers(0, 10**9, size=40)
    cache_insert(arrays, t(keys), f32(rng.standard_normal((40, 4))), stamp=1)
    q = np.concatenate([keys[:30], rng.integers(10**9, 2 * 10**9, size=30)])
    rng.shuffle(q)
    out, hit, pos, count = cache_query(arrays, t(q), return_miss_positions=True)
    misses = np.flatnonzero(~hit.cpu().numpy())
    assert count.item() == misses.size
    np.testing.assert_array_equal(np.sort(pos[: count.item()].cpu().numpy()), misses)
    _ref_out, ref_hit = np_cache_query(arrays.to_numpy(), q)
    np.testing.assert_array_equal(hit.cpu().numpy(), ref_hit)


def test_set_index_spreads_keys_over_sets():
    keys = np.arange(100_000)
    sets = np_set_index(keys, 97)
    counts = np.bincount(sets, minlength=97)
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


def test_capacity_rounds_to_whole_marks_words():
    assert [num_sets_for(c) for c in (1, 32, 33, 64, 1000)] == [4, 4, 8, 8, 128]
    with pytest.raises(ValueError, match="multiple of 4"):
        allocate(3, 2, torch.int64, DEVICE)


def _pool(tables, key_dtype):
    """A cache per (capacity, dim), each with its counters, and their parameter rows."""
    per = [allocate(num_sets_for(c), d, key_dtype, DEVICE) for c, d in tables]
    counters = [torch.zeros(2, dtype=torch.int64, device=DEVICE) for _ in tables]
    params = torch.stack([cache_params(a, c) for a, c in zip(per, counters, strict=True)])
    return params, per, counters


@pytest.mark.parametrize(
    "policy,tables,uniform",
    [("lru", [(64, 16), (40, 1), (100, 100), (32, 128), (64, 16)], False),  # mixed dims
     ("lfu", [(64, 16), (4, 16), (100, 16), (40, 16)], False),  # one dim, counts differ
     ("lru", [(64, 16), (4, 16), (100, 16)], True)],  # one dim and count: nothing copied in
)
def test_fused_multi_table_query_equals_per_table(rng, policy, tables, uniform):
    params, per, counters = _pool(tables, torch.int64)
    refs = []
    keys_per_table = []
    n_all = int(rng.integers(1, 40 * GPU_SCALE))
    for i, ((cap, dim), arrays) in enumerate(zip(tables, per, strict=True)):
        ks = rng.integers(-50, 50 + cap, size=cap) + 1000 * i  # overlapping ids across tables
        vals = rng.standard_normal((cap, dim)).astype(np.float32)
        cache_insert(arrays, t(ks), f32(vals), policy=policy, stamp=1)
        refs.append(arrays.to_numpy())
        n = n_all if uniform else 0 if i == 1 else int(rng.integers(1, 40 * GPU_SCALE))
        keys_per_table.append(rng.integers(-60, 60 + cap, size=n) + 1000 * i)
    flat = t(np.concatenate(keys_per_table))
    counts = [k.size for k in keys_per_table]
    dims = [d for _, d in tables]
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    values, hit = fused_cache_query(params, flat, counts, dims, policy=policy, miss_flag=flag)
    ref_vals, ref_hits = np_fused_cache_query(refs, keys_per_table, policy=policy)
    np.testing.assert_array_equal(hit.cpu().numpy(), np.concatenate(ref_hits))
    assert int(flag) == int((~np.concatenate(ref_hits)).any())
    for i, arrays in enumerate(per):
        assert values[i].shape == (keys_per_table[i].size, tables[i][1])
        np.testing.assert_array_equal(values[i].cpu().numpy(), ref_vals[i])
        assert_same_state(arrays, refs[i])
        assert counters[i].tolist() == [int(ref_hits[i].sum()), int((~ref_hits[i]).sum())]
        # and equals the single-table kernel on the same keys
        v1, h1 = cache_query(arrays, t(keys_per_table[i]), touch=False)
        np.testing.assert_array_equal(v1.cpu().numpy(), ref_vals[i])
    with pytest.raises(ValueError, match="counts"):
        fused_cache_query(params, flat, counts[:-1], dims)


def test_fused_query_over_one_full_set(rng):
    # Uniform dims; table 1's set 1 is full and 40 more keys of that set are asked for.
    tables = [(64, 4), (64, 4)]
    params, per, _counters = _pool(tables, torch.int64)
    keys1 = _same_set_keys(rng, per[1].num_sets, 40)
    keys0 = rng.integers(0, 200, size=64)
    refs = []
    for arrays, ks in zip(per, (keys0, keys1[:8]), strict=True):
        vals = rng.standard_normal((ks.size, 4)).astype(np.float32)
        cache_insert(arrays, t(ks), f32(vals), stamp=1)
        refs.append(arrays.to_numpy())
    q = [rng.integers(0, 250, size=50), rng.permutation(np.concatenate([keys1, keys1[:8]]))]
    values, hit = fused_cache_query(params, t(np.concatenate(q)), [q[0].size, q[1].size],
                                    [4, 4])
    ref_vals, ref_hits = np_fused_cache_query(refs, q)
    np.testing.assert_array_equal(hit.cpu().numpy(), np.concatenate(ref_hits))
    for i in range(2):
        np.testing.assert_array_equal(values[i].cpu().numpy(), ref_vals[i])
        assert_same_state(per[i], refs[i])
    assert ref_hits[1].sum() == 16 and (~ref_hits[1]).sum() == 32


@pytest.mark.parametrize("dim", [1, 16, 100, 128])
def test_gather_matches_reference(rng, dim):
    table = rng.standard_normal((300, dim)).astype(np.float32)
    idx = rng.integers(0, 300, size=77 * GPU_SCALE)
    for dtype in (torch.int64, torch.int32):
        out = gather(f32(table), t(idx, dtype))
        np.testing.assert_array_equal(out.cpu().numpy(), np_gather(table, idx))


def _same_set_keys(rng, num_sets, count, which=1):
    """``count`` distinct random keys that all land in set ``which``."""
    cands = rng.integers(-(2**62), 2**62, size=max(4000, 40 * count * num_sets))
    same = np.unique(cands[np_set_index(cands, num_sets) == which])
    assert same.size >= count
    return rng.permutation(same)[:count]


@pytest.mark.parametrize("mark_check", [False, True])
def test_probe_of_a_full_set_finds_exactly_the_residents(rng, mark_check):
    # 40 keys of one set, 8 resident: every probe compares against a full key block.
    num_sets = 4
    keys = _same_set_keys(rng, num_sets, 40)
    arrays = allocate(num_sets, 4, torch.int64, DEVICE)
    ref = arrays.to_numpy()
    vals = rng.standard_normal((8, 4)).astype(np.float32)
    cache_insert(arrays, t(keys[:8]), f32(vals), stamp=1)
    np_cache_insert(ref, keys[:8], vals, stamp=1)
    q = rng.permutation(np.concatenate([keys, keys[:8]]))
    out, hit = cache_query(arrays, t(q), row_evict="evict_first", mark_check=mark_check)
    ref_out, ref_hit = np_cache_query(ref, q)
    np.testing.assert_array_equal(hit.cpu().numpy(), ref_hit)
    np.testing.assert_array_equal(out.cpu().numpy(), ref_out)
    assert ref_hit.sum() == 16 and (~ref_hit).sum() == 32
    assert_same_state(arrays, ref)


def test_sketch_counts_follow_reference(rng):
    width_log2 = 10
    sketch = new_sketch(width_log2, DEVICE)
    ref = np.zeros(sketch.numel(), dtype=np.int64)
    pool = np.unique(rng.integers(-(2**62), 2**62, size=300))
    true = np.zeros(pool.size, dtype=np.int64)
    for _ in range(3):
        idx = rng.integers(0, pool.size, size=500)  # duplicates count once per occurrence
        sketch_add(sketch, t(pool[idx]), width_log2)
        np_sketch_add(ref, pool[idx], width_log2)
        np.add.at(true, idx, 1)
    np.testing.assert_array_equal(sketch.cpu().numpy(), ref)
    est = np_sketch_estimate(ref, pool, width_log2)
    assert (est >= true).all()  # a count-min estimate never undercounts
    assert (est == true).mean() > 0.9  # and with 4 rows of 1024 it is mostly exact


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_tinylfu_admission_follows_reference(rng, policy):
    num_sets, width_log2 = 8, 10
    arrays = allocate(num_sets, 4, torch.int64, DEVICE)
    ref = arrays.to_numpy()
    sketch = new_sketch(width_log2, DEVICE)
    ref_sketch = np.zeros(sketch.numel(), dtype=np.int64)
    pool = rng.integers(-(2**62), 2**62, size=num_sets * SLOTS_PER_SET * 3)
    hot = pool[: num_sets * 4]
    total = np.zeros(3, dtype=np.int64)
    for rnd in range(4):
        q = np.concatenate([draw_keys(rng, 60, hot), draw_keys(rng, 40, pool)])
        cache_query(arrays, t(q), policy=policy)
        np_cache_query(ref, q, policy=policy)
        sketch_add(sketch, t(q), width_log2)
        np_sketch_add(ref_sketch, q, width_log2)
        ins = draw_keys(rng, 50, pool)
        vals = rng.standard_normal((50, 4)).astype(np.float32)
        counters = torch.zeros(5, dtype=torch.int64, device=DEVICE)
        cache_insert(arrays, t(ins), f32(vals), policy=policy, stamp=2 * rnd + 2,
                     counters=counters, sketch=(sketch, width_log2))
        got = np_cache_insert(ref, ins, vals, policy=policy, stamp=2 * rnd + 2,
                              sketch=(ref_sketch, width_log2))
        assert counters[2:].tolist() == list(got)
        total += got
        assert_same_state(arrays, ref)
    assert total[2] > 0 and total[0] > 0  # some keys were kept out, some admitted
