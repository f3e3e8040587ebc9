"""Several devices: a table's GPU tier sharded by key (keras_hps/gpu_shards.py) or replicated.

Shards and replicas run as virtual devices on one device (the CPU through Triton's
interpreter on CI, GPU 0 on a GPU machine), so CI covers the routing; the last tests need two
real GPUs. Every answer is compared with a single cache or table and with NumPy."""

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("h5py")

from keras_hps.errors import ConfigError, InvalidInputError  # noqa: E402
from keras_hps.formats import write_hdf5_table  # noqa: E402
from keras_hps.gpu_cache import GpuEmbeddingCache  # noqa: E402
from keras_hps.gpu_shards import (  # noqa: E402
    ROUTE_BYTES_PER_KEY,
    KeyRoute,
    ShardedCache,
    ShardedStaticTable,
    shard_slots,
    split_rows,
)
from keras_hps.gpu_static_table import GpuStaticTable  # noqa: E402
from keras_hps.gpu_tier import (  # noqa: E402
    CaptureScope,
    deferring,
    gpu_tier_devices,
    query_tables,
)
from keras_hps.parameter_server import ParameterServer  # noqa: E402
from keras_hps.triton_kernels.cache_layout import np_set_index  # noqa: E402
from keras_hps.triton_kernels.shard_route import np_shard_owner, shard_owner  # noqa: E402
from keras_hps.triton_kernels.static_table import home_slots  # noqa: E402

DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
SENTINEL = 2**63 - 1
ROWS, DIM, DEFAULT = 600, 8, -0.5


def _keys(rng, n, lo=-(2**40), hi=2**40):
    keys = np.unique(rng.integers(lo, hi, n + n // 4))
    rng.shuffle(keys)
    return keys[:n]


# ---------------------------------------------------------------------------- the owner kernel
@pytest.mark.parametrize("n_shards", [1, 2, 3, 4, 7])
def test_shard_owner_matches_reference_and_balances(n_shards):
    rng = np.random.default_rng()
    keys = np.r_[rng.integers(-(2**63), 2**63 - 1, 3000), np.arange(1000), SENTINEL, -1, 0]
    got = shard_owner(torch.from_numpy(keys).to(DEVICE), n_shards).cpu().numpy()
    np.testing.assert_array_equal(got, np_shard_owner(keys, n_shards))
    assert got.dtype == np.int32 and got.min() >= 0 and got.max() < n_shards
    counts = np.bincount(got, minlength=n_shards)
    assert counts.min() > 0.8 * keys.size / n_shards  # identity keys spread like random ones
    k32 = rng.integers(-(2**31), 2**31 - 1, 500).astype(np.int32)
    np.testing.assert_array_equal(
        shard_owner(torch.from_numpy(k32).to(DEVICE), n_shards).cpu().numpy(),
        np_shard_owner(k32.astype(np.int64), n_shards))
    assert shard_owner(torch.empty(0, dtype=torch.int64, device=DEVICE), n_shards).numel() == 0
    with pytest.raises(ValueError, match="int32 or int64"):
        shard_owner(torch.zeros(3, device=DEVICE), n_shards)


def test_a_shards_keys_still_fill_every_set_and_slot():
    """The owner hash is independent of the cache's set hash and the static index's home slot:
    keys of one shard spread over all of a shard's sets and slots."""
    rng = np.random.default_rng()
    keys = rng.integers(-(2**62), 2**62, 20000)
    mine = keys[np_shard_owner(keys, 4) == 1]
    sets = np_set_index(mine, 64)
    assert np.bincount(sets, minlength=64).min() > 0.6 * mine.size / 64
    slots = home_slots(torch.from_numpy(mine).to(DEVICE), 255).cpu().numpy()
    assert np.bincount(slots, minlength=256).min() > 0.3 * mine.size / 256


def test_key_route_groups_by_owner_and_counts_its_memory():
    rng = np.random.default_rng()
    keys = torch.from_numpy(np.r_[rng.integers(0, 10**6, 300), [7, 7, 7]]).to(DEVICE)
    route = KeyRoute(keys, 3)
    owner = np_shard_owner(keys.cpu().numpy(), 3)
    seen = []
    for i, part, pos in route.parts():
        assert (owner[pos.cpu().numpy()] == i).all()
        np.testing.assert_array_equal(part.cpu().numpy(), keys.cpu().numpy()[pos.cpu().numpy()])
        assert (np.diff(pos.cpu().numpy()) > 0).all()  # stable: input order within a shard
        seen.append(pos.cpu().numpy())
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(keys.numel()))
    assert route.nbytes == keys.numel() * ROUTE_BYTES_PER_KEY


# ---------------------------------------------------------------------------- sharded cache
def _single_and_sharded(n_shards, capacity=1024, dim=DIM, **kw):
    single = GpuEmbeddingCache(capacity, dim, device=DEVICE, **kw)
    shards = [GpuEmbeddingCache(shard_slots(capacity, n_shards), dim, device=DEVICE, **kw)
              for _ in range(n_shards)]
    return single, ShardedCache(shards, home=DEVICE)


def _both(single, sharded, method, *args, **kw):
    a = getattr(single, method)(*args, **kw)
    b = getattr(sharded, method)(*args, **kw)
    if a is not None:
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.cpu().numpy(), y.cpu().numpy())
    return a


@pytest.mark.parametrize("n_shards", [2, 3, 4])
def test_sharded_cache_answers_as_one_cache(n_shards):
    rng = np.random.default_rng()
    single, sharded = _single_and_sharded(n_shards)
    assert sharded.capacity >= single.capacity and sharded.device == DEVICE
    keys = _keys(rng, 90)
    rows = rng.standard_normal((keys.size, DIM)).astype(np.float32)
    dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE)  # noqa: E731
    # duplicates in an insert: the last row of a repeated key is kept, by both
    ins = np.r_[keys, keys[:5]]
    ins_rows = np.r_[rows, rows[5:10]]
    _both(single, sharded, "insert", dev(ins), dev(ins_rows))
    assert sharded.size == single.size == keys.size
    q = np.r_[rng.choice(keys, 60), _keys(rng, 20, 2**41, 2**42), keys[:3], keys[:3]]
    rng.shuffle(q)
    vals, hit = _both(single, sharded, "query", dev(q))
    want = {int(k): r for k, r in zip(ins, ins_rows, strict=True)}
    for i, k in enumerate(q):
        assert bool(hit[i]) == (int(k) in want)
        np.testing.assert_array_equal(vals[i].cpu().numpy(),
                                      want.get(int(k), np.zeros(DIM, np.float32)))
    # a non-contiguous key tensor, an empty batch, the sentinel (validated: an error; not
    # validated: never stored, a miss)
    q2 = dev(np.stack([q, q], 1))[:, 1]
    assert not q2.is_contiguous()
    _both(single, sharded, "query", q2)
    _both(single, sharded, "query", dev(np.zeros(0, np.int64)))
    for cache in (single, sharded):
        with pytest.raises(InvalidInputError, match="sentinel"):
            cache.query(dev(np.r_[keys[:2], SENTINEL]))
    _, hit = _both(single, sharded, "query", dev(np.r_[keys[:2], SENTINEL]), validate=False)
    assert hit.cpu().tolist() == [True, True, False]
    # update and invalidate reach the owner shard
    new = rng.standard_normal((10, DIM)).astype(np.float32)
    _both(single, sharded, "update", dev(np.r_[keys[:8], _keys(rng, 2, 2**43, 2**44)]), dev(new))
    _both(single, sharded, "invalidate", dev(keys[8:20]))
    vals, hit = _both(single, sharded, "query", dev(keys[:20]))
    np.testing.assert_array_equal(vals[:8].cpu().numpy(), new[:8])
    assert hit.cpu().tolist() == [True] * 8 + [False] * 12
    a, b = single.stats(), sharded.stats()
    assert {k: a[k] for k in ("hits", "misses", "insertions", "size")} == \
        {k: b[k] for k in ("hits", "misses", "insertions", "size")}
    sharded.clear()
    assert sharded.size == 0


# ---------------------------------------------------------------------------- sharded table
@pytest.mark.parametrize("n_shards", [2, 3, 4])
@pytest.mark.parametrize("on_device", [True, False])  # static mode; uvm (rows in host memory)
def test_sharded_static_table_answers_as_one_table(n_shards, on_device):
    rng = np.random.default_rng()
    keys = _keys(rng, 500)
    rows = rng.standard_normal((keys.size, DIM)).astype(np.float32)
    tk, tv = torch.from_numpy(keys), torch.from_numpy(rows)
    n_dev = None if on_device else 0
    single = GpuStaticTable(tk, tv, device=DEVICE, n_device=n_dev)
    parts = list(split_rows(tk, tv, n_shards, pinned=False))
    owner = np_shard_owner(keys, n_shards)
    pos = {int(k): i for i, k in enumerate(keys)}
    for i, (k, v) in enumerate(parts):  # each shard holds exactly its own keys' rows
        assert sorted(k.tolist()) == sorted(keys[owner == i].tolist())
        np.testing.assert_array_equal(v.numpy(), rows[[pos[x] for x in k.tolist()]])
    table = ShardedStaticTable([GpuStaticTable(k, v, device=DEVICE, n_device=n_dev)
                                for k, v in parts], home=DEVICE)
    assert len(table) == len(single) == keys.size
    dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE)  # noqa: E731
    q = np.r_[rng.choice(keys, 200), _keys(rng, 30, 2**41, 2**42), SENTINEL, keys[:4], keys[:4]]
    rng.shuffle(q)
    default = dev(np.full(DIM, DEFAULT, np.float32))
    ca, cb = (torch.zeros(2, dtype=torch.int64, device=DEVICE) for _ in range(2))
    a = single.query(dev(q), default, counters=ca)
    b = table.query(dev(q), default, counters=cb)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.cpu().numpy(), y.cpu().numpy())
    hits = int(np.isin(q, keys).sum())
    assert ca.tolist() == cb.tolist() == [hits, q.size - hits]
    for i, k in enumerate(q):
        want = rows[pos[int(k)]] if int(k) in pos else np.full(DIM, DEFAULT, np.float32)
        np.testing.assert_array_equal(b[0][i].cpu().numpy(), want)
    if not on_device:  # uvm's copy-engine read: same rows, zeros for misses
        a = single.query(dev(q), host_read="copy")
        b = table.query(dev(q), host_read="copy")
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.cpu().numpy(), y.cpu().numpy())
    empty = table.query(dev(np.zeros(0, np.int64)))
    assert empty[0].shape == (0, DIM) and empty[1].shape == (0,)
    upd = np.r_[keys[:6], _keys(rng, 2, 2**43, 2**44)]
    new = rng.standard_normal((upd.size, DIM)).astype(np.float32)
    np.testing.assert_array_equal(single.update(dev(upd), dev(new)).cpu().numpy(),
                                  table.update(dev(upd), dev(new)).cpu().numpy())
    a, b = single.query(dev(upd)), table.query(dev(upd))
    np.testing.assert_array_equal(a[0].cpu().numpy(), b[0].cpu().numpy())
    np.testing.assert_array_equal(b[0][:6].cpu().numpy(), new[:6])


# ---------------------------------------------------------------------------- the whole tier
@pytest.fixture(scope="module")
def virtual():
    """Several devices of deployed_device_list on one: GPU 0, else the CPU (interpreter)."""
    setting = "virtual" if torch.cuda.is_available() else "interpret"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_HPS_GPU_TIER", setting)
        yield setting


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """(path, keys, rows) of an HDF5 table of random keys."""
    rng = np.random.default_rng()
    keys, path = _keys(rng, ROWS), tmp_path_factory.mktemp("gpu_shards") / "t0.h5"
    vectors = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    write_hdf5_table(path, keys, vectors)
    return str(path), keys, vectors


def _config(path, devices, **model):
    m = {"model": "m", "sparse_files": [path], "embedding_vecsize_per_table": [DIM],
         "maxnum_catfeature_query_per_table_per_sample": [64],
         "default_value_for_each_table": [DEFAULT], "max_batch_size": 64,
         "deployed_device_list": list(devices), "gpucacheper": 0.5, "hit_rate_threshold": 1.0}
    m.update(model)
    return {"models": [m], "volatile_db": {"initial_cache_rate": 0.3}}


def _reference(keys, vectors, q):
    """Each key's row of the table, the default vector for keys it lacks (NumPy)."""
    order = np.argsort(keys)
    at = np.searchsorted(keys[order], q).clip(0, keys.size - 1)
    found = keys[order][at] == q
    return np.where(found[..., None], vectors[order[at]], np.float32(DEFAULT))


def test_devices_of_the_virtual_settings(monkeypatch):
    monkeypatch.setenv("KERAS_HPS_GPU_TIER", "virtual")
    if torch.cuda.is_available():  # (interpret needs kernels not yet loaded compiled)
        assert gpu_tier_devices(True, (0, 5)) == [torch.device("cuda", 0)] * 2
        return
    with pytest.raises(ConfigError, match="virtual needs a CUDA device"):
        gpu_tier_devices(True, (0, 1))
    monkeypatch.setenv("KERAS_HPS_GPU_TIER", "interpret")
    assert gpu_tier_devices(True, (0, 1, 2)) == [torch.device("cpu")] * 3
    assert gpu_tier_devices(True, ()) == [torch.device("cpu")]


@pytest.mark.parametrize("n_shards", [2, 3, 4])
@pytest.mark.parametrize("mode", ["dynamic", "static", "uvm"])
def test_sharded_tier_is_exact_through_the_hierarchy(virtual, table, mode, n_shards):
    """Shards fill from the tiers below, answer exactly, stay exact after updates."""
    path, keys, vectors = table
    rng = np.random.default_rng()
    cfg = _config(path, range(n_shards), embedding_cache_type=mode, gpu_placement="shard")
    with ParameterServer(cfg) as ps:
        tiered = ps.table("m", 0)
        tier = tiered.gpu
        assert tier.placement == "shard" and len(tier.devices) == n_shards
        known = rng.choice(keys, 40, replace=False)
        unknown = _keys(rng, 6, 2**41, 2**42)
        q = np.repeat(np.r_[known, unknown, SENTINEL], rng.integers(1, 3, 47))
        rng.shuffle(q)
        np.testing.assert_array_equal(ps.lookup("m", 0, q), _reference(keys, vectors, q))
        np.testing.assert_array_equal(ps.lookup("m", 0, q), _reference(keys, vectors, q))
        s = tier.stats()
        distinct = 47
        if mode == "static":  # every key counted, the table is whole on the shards
            assert s["resident"] == ROWS and s["fetched"] == 0
            assert s["hits"] == 2 * int(np.isin(q, keys).sum())
        else:  # first lookup: all missed and filled from below (unknown keys with the
            # default row); second: all hit but the sentinel key, which is never cached
            assert s["misses"] == distinct + 1 and s["hits"] == distinct - 1
            assert s["resident"] == distinct - 1
            assert s["capacity"] == n_shards * shard_slots(tier.slots, n_shards)
            if mode == "uvm":
                assert s["uvm_hits"] == 40
        # torch in -> torch out; a 2-D non-contiguous key tensor; an empty batch
        t = torch.from_numpy(np.stack([q[:20], q[20:40]], 1)).t()
        assert not t.is_contiguous()
        np.testing.assert_array_equal(ps.lookup("m", 0, t).numpy(),
                                      _reference(keys, vectors, t.numpy()))
        assert ps.lookup("m", 0, np.zeros((0, 2), np.int64)).shape == (0, 2, DIM)
        # an update: new rows, and a key the table file never held
        new = rng.standard_normal((6, DIM)).astype(np.float32)
        upd = np.r_[known[:5], unknown[:1]]
        tiered.apply_update(upd, new)
        got = ps.lookup("m", 0, np.r_[upd, known[5:10]])
        np.testing.assert_array_equal(got[:6], new)
        np.testing.assert_array_equal(got[6:], _reference(keys, vectors, known[5:10]))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_a_sharded_lookup_refuses_capture_and_the_fused_launch(virtual, table, mode):
    """A sharded lookup sizes its groups on the host: inside a capture scope it raises a
    clear error (instead of a wrong graph), and the multi-table launch declines it."""
    path, keys, vectors = table
    cfg = _config(path, range(2), embedding_cache_type=mode, gpu_placement="shard")
    with ParameterServer(cfg) as ps:
        tier = ps.table("m", 0).gpu
        q = torch.from_numpy(keys[:8].copy()).to(DEVICE)
        with deferring(CaptureScope(DEVICE)), pytest.raises(RuntimeError, match="sharded"):
            ps.lookup("m", 0, q)
        assert query_tables([tier, tier], [q, q]) is None
        np.testing.assert_array_equal(ps.lookup("m", 0, q).cpu().numpy(),  # still serving
                                      _reference(keys, vectors, keys[:8]))


@pytest.mark.parametrize("placement", ["replicate", "shard"])
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_a_column_of_a_batch_is_looked_up_exactly(virtual, table, mode, placement):
    """Keys sliced from a batch (``cat[:, i]``: 1-D and strided) give their own rows."""
    path, keys, vectors = table
    rng = np.random.default_rng()
    cfg = _config(path, range(2), embedding_cache_type=mode, gpu_placement=placement)
    with ParameterServer(cfg) as ps:
        cat = torch.from_numpy(rng.choice(keys, (20, 3))).to(DEVICE)
        for i in range(3):
            col = cat[:, i]
            assert not col.is_contiguous()
            np.testing.assert_array_equal(ps.lookup("m", 0, col).cpu().numpy(),
                                          _reference(keys, vectors, col.cpu().numpy()))


def test_replicas_answer_alike_and_threads_take_turns(virtual, table):
    """Replicate: each device holds a whole cache; NumPy lookups from different threads run
    on different devices, one thread's lookups on one device, all exact."""
    path, keys, vectors = table
    rng = np.random.default_rng()
    n = 3
    with ParameterServer(_config(path, range(n))) as ps:
        tier = ps.table("m", 0).gpu
        assert tier.placement == "replicate" and len(tier._replicas) == n
        q = rng.choice(keys, 30, replace=False)
        barrier = threading.Barrier(n)
        out, errors = {}, []

        def work(i):
            try:
                barrier.wait(timeout=60)
                out[i] = [ps.lookup("m", 0, q) for _ in range(2)]
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for i in range(n):
            for got in out[i]:
                np.testing.assert_array_equal(got, _reference(keys, vectors, q))
        # every replica served one thread: 30 misses then 30 hits each
        per = [r.cache.stats() for r in tier._replicas]
        assert [(s["misses"], s["hits"], s["size"]) for s in per] == [(30, 30, 30)] * n
        # and holds the same rows
        rows = [r.cache.query(torch.from_numpy(q).to(r.device))[0].cpu().numpy()
                for r in tier._replicas]
        for r in rows:
            np.testing.assert_array_equal(r, rows[0])
        assert tier.stats()["capacity"] == n * tier.slots


# ---------------------------------------------------------------------------- real GPUs
@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures CUDA allocations")
def test_a_sharded_lookup_needs_no_more_than_the_plan_says(virtual, table):
    """The device memory a sharded lookup takes beyond a replicated one's stays within the
    routing buffers `keras-hps plan` adds per key."""
    from keras_hps import plan

    path, keys, _vectors = table
    rng = np.random.default_rng()
    q = torch.from_numpy(rng.choice(keys, 64 * 64)).to(DEVICE)
    peaks = {}
    for placement in ("replicate", "shard"):
        cfg = _config(path, range(3), embedding_cache_type="static", gpu_placement=placement)
        with ParameterServer(cfg) as ps:
            ps.lookup("m", 0, q)  # first call: anything allocated once
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            ps.lookup("m", 0, q)
            torch.cuda.synchronize()
            peaks[placement] = torch.cuda.max_memory_allocated() - before
    extra = q.numel() * (plan.ROUTE_BYTES_PER_KEY + 11 + 8 * DIM)
    assert 0 < peaks["shard"] - peaks["replicate"] <= extra + 2 * 512 * 3, peaks


two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two GPUs")


@two_gpus
@pytest.mark.parametrize("placement", ["replicate", "shard"])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_two_real_gpus(table, monkeypatch, placement, mode):
    """Each replica or shard lives on its own GPU; lookups of keys on either GPU are exact,
    whatever the current device."""
    monkeypatch.setenv("KERAS_HPS_GPU_TIER", "auto")
    path, keys, vectors = table
    rng = np.random.default_rng()
    cfg = _config(path, (0, 1), embedding_cache_type=mode, gpu_placement=placement)
    with ParameterServer(cfg) as ps:
        tier = ps.table("m", 0).gpu
        assert tier.devices == [torch.device("cuda", 0), torch.device("cuda", 1)]
        q = np.r_[rng.choice(keys, 200), _keys(rng, 10, 2**41, 2**42)]
        torch.cuda.set_device(0)
        for d in (1, 0, 1):
            got = ps.lookup("m", 0, torch.from_numpy(q).to(f"cuda:{d}"))
            assert got.device == torch.device("cuda", d)
            np.testing.assert_array_equal(got.cpu().numpy(), _reference(keys, vectors, q))
        np.testing.assert_array_equal(ps.lookup("m", 0, q), _reference(keys, vectors, q))
        if placement == "replicate":  # a lookup on GPU 1 allocates nothing on GPU 0
            keys1 = torch.from_numpy(q).to("cuda:1")
            ps.lookup("m", 0, keys1)
            torch.cuda.synchronize(0)
            torch.cuda.reset_peak_memory_stats(0)
            before = torch.cuda.memory_allocated(0)
            ps.lookup("m", 0, keys1)
            torch.cuda.synchronize(1)
            assert torch.cuda.max_memory_allocated(0) == before
