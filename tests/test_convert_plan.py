"""`keras-hps convert` and `keras-hps plan` on real files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from keras_hps import cli
from keras_hps.formats import open_table, write_hdf5_table, write_hps_table
from keras_hps.parameter_server import ParameterServer
from keras_hps.plan import plan_config


def table_dict(path) -> dict[int, np.ndarray]:
    with open_table(path) as t:
        return {int(k): v.copy() for k, v in zip(t.keys[:], t.vectors[:], strict=True)}


@pytest.fixture
def hps_dir(tmp_path):
    rng = np.random.default_rng(30)
    keys = rng.permutation(np.concatenate([[0, -1, 2**60], rng.choice(10**9, 5000, replace=False)]))
    vecs = rng.standard_normal((len(keys), 24)).astype(np.float32)
    write_hps_table(tmp_path / "src", keys, vecs)
    return tmp_path / "src", {int(k): v for k, v in zip(keys, vecs, strict=True)}


def test_convert_hps_to_hdf5_and_back(hps_dir, tmp_path, capsys):
    src, ref = hps_dir
    assert cli.main(["convert", str(src), str(tmp_path / "t.h5"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{len(ref):,} rows, dim 24" in out and "(hps) ->" in out and "(hdf5)" in out
    assert " MB in " in out and " s (" in out
    with open_table(tmp_path / "t.h5") as t:
        assert t.kind == "hdf5"
        np.testing.assert_array_equal(t.keys, sorted(ref))
    got = table_dict(tmp_path / "t.h5")
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)
    assert cli.main(["convert", str(tmp_path / "t.h5"), str(tmp_path / "back"), "--dim", "24",
                     "--quiet"]) == 0
    back = table_dict(tmp_path / "back")
    assert back.keys() == ref.keys() and all(np.array_equal(back[k], ref[k]) for k in ref)


def test_convert_errors_and_options(hps_dir, tmp_path, capsys):
    src, _ = hps_dir
    assert cli.main(["convert", str(src), str(tmp_path / "x.h5"), "--dim", "25", "--quiet"]) == 1
    assert "emb_vector: size" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()
    dst = tmp_path / "t.h5"
    assert cli.main(["convert", str(src), str(dst), "--quiet"]) == 0
    assert cli.main(["convert", str(src), str(dst), "--quiet"]) == 1
    assert "exists (use --force" in capsys.readouterr().err
    assert cli.main(["convert", str(src), str(dst), "--force", "--quiet",
                     "--chunk-rows", "10"]) == 0
    import h5py

    with h5py.File(dst) as f:
        assert f["vectors"].chunks == (10, 24)
    dup = tmp_path / "dup"
    write_hps_table(dup, np.array([3, 1, 3]), np.arange(6, dtype=np.float32).reshape(3, 2),
                    on_duplicate="last")
    (dup / "key").write_bytes(np.array([3, 1, 3], "<i8").tobytes())
    (dup / "emb_vector").write_bytes(np.arange(6, dtype="<f4").tobytes())
    assert cli.main(["convert", str(dup), str(tmp_path / "d.h5"), "--quiet"]) == 1
    assert "duplicate key 3" in capsys.readouterr().err
    assert cli.main(["convert", str(dup), str(tmp_path / "d.h5"), "--quiet",
                     "--on-duplicate", "last"]) == 0
    got = table_dict(tmp_path / "d.h5")
    assert sorted(got) == [1, 3] and got[3].tolist() == [4.0, 5.0]
    assert cli.main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "n.h5")]) == 1
    assert "not found" in capsys.readouterr().err


def test_plan_matches_what_the_parameter_server_allocates(tmp_path, capsys):
    rng = np.random.default_rng(31)
    write_hps_table(tmp_path / "wide", rng.permutation(rng.choice(10**12, 3000, replace=False)),
                    rng.standard_normal((3000, 16)).astype(np.float32))
    write_hdf5_table(tmp_path / "compact.h5", np.arange(-100, 1900),
                     rng.standard_normal((2000, 8)).astype(np.float32))
    cfg = {"supportlonglong": True,
           "volatile_db": {"overflow_margin": 2500},
           "models": [
               {"model": "m1", "sparse_files": ["wide", "compact.h5"],
                "embedding_vecsize_per_table": [16, 8], "gpucacheper": 0.1,
                "maxnum_catfeature_query_per_table_per_sample": [2, 5],
                "deployed_device_list": [0, 1], "max_batch_size": 128},
               {"model": "m2", "sparse_files": ["compact.h5", "ids"],
                "embedding_vecsize_per_table": [8, 8],
                "maxnum_catfeature_query_per_table_per_sample": [1, 1],
                "embedding_cache_type": "static"}]}
    # keys 0..n-1 (an Embedding's table), written out of order: no hash index on the GPU
    write_hps_table(tmp_path / "ids", rng.permutation(700),
                    rng.standard_normal((700, 8)).astype(np.float32))
    (tmp_path / "hps.json").write_text(json.dumps(cfg))
    plans = {(p.model, p.table_id): p for p in plan_config(str(tmp_path / "hps.json"))}
    wide, compact, static = plans[("m1", 0)], plans[("m1", 1)], plans[("m2", 0)]
    # GPU: dynamic cache slots = max(ceil(0.1 x rows), 64) in whole groups of 32 slots, and
    # the bytes of the arrays such a cache allocates
    assert wide.gpu_slots == 320 and compact.gpu_slots == 224
    torch = pytest.importorskip("torch")
    from keras_hps.triton_kernels.cache_layout import allocate, num_sets_for

    a = allocate(num_sets_for(wide.gpu_slots), 16, torch.int64, "cpu")
    assert a.keys.numel() == wide.gpu_slots
    assert wide.gpu_bytes == sum(x.numel() * x.element_size()
                                 for x in (a.keys, a.scores, a.marks, a.vectors))
    from keras_hps.gpu_cache import GpuEmbeddingCache

    cfg["models"][0]["gpu_cache_admission"] = "tinylfu"
    (tmp_path / "hps2.json").write_text(json.dumps(cfg))
    wide2 = plan_config(str(tmp_path / "hps2.json"))[0]
    c = GpuEmbeddingCache(wide.gpu_slots, 16, device="cpu", admission="tinylfu")
    assert wide2.gpu_bytes - wide.gpu_bytes == c._sketch[0].numel() * 4
    assert wide.gpu_workspace_bytes == 128 * 2 * (8 + 16 * 4)
    assert static.gpu_slots == 4096 and static.gpu_bytes == 4096 * 16 + 2000 * 8 * 4
    ids = plans[("m2", 1)]
    assert ids.gpu_slots == 0 and ids.gpu_bytes == 700 * 8 * 4
    from keras_hps.gpu_static_table import GpuStaticTable
    from keras_hps.gpu_tier import _load_table

    for p, path in ((static, "compact.h5"), (ids, "ids")):  # what the GPU tier allocates
        keys, vecs = _load_table(str(tmp_path / path), 8, path, pinned=False)
        table = GpuStaticTable(keys, vecs, device="cpu")
        assert p.gpu_slots == table.index.slots
        assert p.gpu_bytes == table.index.nbytes + table.device_values.numel() * 4
    assert wide.devices == 2 and static.devices == 1
    assert wide.disk_bytes == 3000 * (8 + 16 * 4)
    # host and cold tiers: exactly what a parameter server for this config holds
    with ParameterServer(str(tmp_path / "hps.json")) as ps:
        for (model, t), p in plans.items():
            h = ps._tables[(model, t)]
            h = getattr(h, "hierarchy", h)
            assert p.host_rows == h.host.capacity
            assert p.host_bytes == h.host.nbytes, (model, t)
            assert p.cold_index_bytes == h.cold.index_nbytes
    assert wide.host_rows == 2500 and compact.host_rows == 2000
    assert cli.main(["plan", str(tmp_path / "hps.json")]) == 0
    text = capsys.readouterr().out
    for needle in ("sparse_embedding0", "sparse_embedding1", "m1 total", "m2 total", "all models",
                   "GPU MiB/dev", "m1 x2"):
        assert needle in text
    assert cli.main(["plan", str(tmp_path / "hps.json"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    assert cli.main(["plan", str(tmp_path / "missing.json")]) == 1
    assert "config file not found" in capsys.readouterr().err


def test_plan_counts_the_external_data_of_an_exported_table(tmp_path):
    # An exported HDF5 table is a header over the HPS files: its disk size includes them.
    from keras_hps.formats import write_hdf5_table_over_hps

    rng = np.random.default_rng(32)
    keys, vecs = np.arange(0, 4000, 2), rng.standard_normal((2000, 12)).astype(np.float32)
    write_hps_table(tmp_path / "emb", keys, vecs)
    h5 = write_hdf5_table_over_hps(tmp_path / "emb.h5", tmp_path / "emb")
    cfg = {"models": [{"model": "m", "sparse_files": ["emb.h5"],
                       "embedding_vecsize_per_table": [12],
                       "maxnum_catfeature_query_per_table_per_sample": [1]}]}
    (tmp_path / "hps.json").write_text(json.dumps(cfg))
    (plan,) = plan_config(str(tmp_path / "hps.json"))
    assert plan.disk_bytes == h5.stat().st_size + keys.size * 8 + vecs.nbytes
    assert plan.rows == 2000


@pytest.mark.parametrize("placement", ["replicate", "shard"])
def test_plan_per_gpu_matches_what_each_device_holds(tmp_path, capsys, monkeypatch, placement):
    """Several GPUs: replicated, each GPU holds the whole cache or table; sharded, the largest
    share of the rows (as the GPU tier splits them), plus routing buffers per lookup. Checked
    against the arrays a parameter server allocates on each of three virtual devices (GPU 0,
    or the CPU through Triton's interpreter)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from keras_hps import gpu_shards, plan

    rng = np.random.default_rng(33)
    write_hps_table(tmp_path / "wide", rng.permutation(rng.choice(10**12, 3000, replace=False)),
                    rng.standard_normal((3000, 16)).astype(np.float32))
    write_hdf5_table(tmp_path / "compact.h5", np.arange(-100, 1900),
                     rng.standard_normal((2000, 8)).astype(np.float32))
    common = {"deployed_device_list": [0, 1, 2], "gpu_placement": placement,
              "max_batch_size": 128}
    cfg = {"volatile_db": {"type": "disabled"}, "models": [
        {"model": "dyn", "sparse_files": ["wide", "compact.h5"], "gpucacheper": 0.1,
         "embedding_vecsize_per_table": [16, 8],
         "maxnum_catfeature_query_per_table_per_sample": [2, 5], **common},
        {"model": "sta", "sparse_files": ["wide", "compact.h5"],
         "embedding_cache_type": "static", "embedding_vecsize_per_table": [16, 8],
         "maxnum_catfeature_query_per_table_per_sample": [1, 1], **common}]}
    (tmp_path / "hps.json").write_text(json.dumps(cfg))
    plans = {(p.model, p.table_id): p for p in plan_config(str(tmp_path / "hps.json"))}
    assert {p.placement for p in plans.values()} == {placement}
    assert plan.ROUTE_BYTES_PER_KEY == gpu_shards.ROUTE_BYTES_PER_KEY
    monkeypatch.setenv("KERAS_HPS_GPU_TIER",
                       "virtual" if torch.cuda.is_available() else "interpret")
    with ParameterServer(str(tmp_path / "hps.json")) as ps:
        for (model, t), p in plans.items():
            tier = ps.table(model, t).gpu
            per_device = []
            for rep in tier._replicas:
                if rep.cache is not None:
                    owners = getattr(rep.cache, "shards", [rep.cache])
                    per_device.append([
                        (c.capacity, sum(x.nbytes for x in (c.arrays.keys, c.arrays.scores,
                                                            c.arrays.marks, c.arrays.vectors)))
                        for c in owners])
                else:
                    owners = getattr(rep.table, "shards", [rep.table])
                    per_device.append([(s.index.slots, s.index.pairs.nbytes
                                        + s.device_values.nbytes) for s in owners])
            if placement == "shard":  # three views of the same three shards
                assert all(d == per_device[0] for d in per_device) and len(per_device[0]) == 3
                held = per_device[0]
                rows = sum(len(s) for s in getattr(tier._replicas[0].table, "shards", []))
                assert rows in (0, p.rows)  # static shards hold each row once
            else:  # each device holds one whole copy
                held = [d[0] for d in per_device]
                assert len(held) == 3 and len(set(held)) == 1
            assert (p.gpu_slots, p.gpu_bytes) == max(held), (model, t)
            base = ps.config.model(model).max_keys_per_lookup(t) * (8 + 4 * p.dim)
            extra = (ps.config.model(model).max_keys_per_lookup(t)
                     * (plan.ROUTE_BYTES_PER_KEY + 11 + 8 * p.dim))
            assert p.gpu_workspace_bytes == base + (extra if placement == "shard" else 0)
    # a sharded dynamic cache: a third of the slots (whole groups of 32) per GPU
    assert plans[("dyn", 0)].gpu_slots == (320 if placement == "replicate" else 128)
    assert cli.main(["plan", str(tmp_path / "hps.json")]) == 0
    text = capsys.readouterr().out
    assert ("dyn x3 (sharded: each device's share)" in text) == (placement == "shard")
    # a route's own buffers are what the plan counts for them
    keys = torch.arange(1000, dtype=torch.int64)
    assert gpu_shards.KeyRoute(keys, 3).nbytes == 1000 * plan.ROUTE_BYTES_PER_KEY
