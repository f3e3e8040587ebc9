"""The external placement's table files: one copy of the bytes serves both formats.

With keys in sorted order the exporter writes the HPS `key` / `emb_vector` files once and an
HDF5 table whose datasets are stored in them (HDF5 external storage). Every keras-hps reader
(formats, cold tier, convert, parameter server, inspect) must read that table exactly like a
self-contained one, from any working directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from keras_hps.cold_tier import ColdTier  # noqa: E402
from keras_hps.convert import convert  # noqa: E402
from keras_hps.formats import (  # noqa: E402
    TableFormatError,
    read_hdf5_table,
    read_hps_table,
    table_disk_bytes,
    write_hdf5_table,
    write_hdf5_table_over_hps,
    write_hps_table,
)


def _sorted_table(rng, n, dim):
    """Sorted unique keys over the whole int64 range (edges included) and random rows."""
    inner = rng.choice(np.arange(-(2**40), 2**40, 7919), size=n - 2, replace=False)
    keys = np.sort(np.concatenate([[np.iinfo(np.int64).min, np.iinfo(np.int64).max], inner]))
    return keys.astype(np.int64), rng.standard_normal((n, dim)).astype(np.float32)


@pytest.fixture
def shared(tmp_path):
    rng = np.random.default_rng(11)
    keys, vectors = _sorted_table(rng, 3000, 24)
    hps = tmp_path / "tables" / "emb"
    write_hps_table(hps, keys, vectors)
    h5 = write_hdf5_table_over_hps(tmp_path / "tables" / "emb.h5", hps)
    return keys, vectors, hps, h5


def test_hdf5_over_hps_reads_like_the_table_from_any_directory(shared, tmp_path, monkeypatch):
    keys, vectors, hps, h5 = shared
    with h5py.File(h5) as f:
        assert f["keys"].external == [("emb/key", 0, keys.nbytes)]
        assert f["vectors"].external == [("emb/emb_vector", 0, vectors.nbytes)]
    # The HDF5 file is a header: the bytes are the HPS files', which are unchanged.
    assert os.path.getsize(h5) < 16 * 1024
    assert table_disk_bytes(h5) == os.path.getsize(h5) + keys.nbytes + vectors.nbytes
    np.testing.assert_array_equal(np.fromfile(hps / "key", "<i8"), keys)
    np.testing.assert_array_equal(np.fromfile(hps / "emb_vector", "<f4"), vectors.ravel())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # HDF5 alone would resolve the names against the cwd
    with read_hdf5_table(h5) as t:
        assert (t.num_rows, t.dim) == vectors.shape
        assert isinstance(t.vectors, np.memmap)  # read straight from emb_vector
        np.testing.assert_array_equal(np.asarray(t.keys), keys)
        np.testing.assert_array_equal(np.asarray(t.vectors), vectors)
        rows = np.random.default_rng(1).integers(0, len(keys), 50)
        np.testing.assert_array_equal(t.read_rows(rows), vectors[rows])


def test_cold_tier_lookup_over_shared_files(shared):
    keys, vectors, _, h5 = shared
    rng = np.random.default_rng(2)
    hits = rng.choice(keys, 200, replace=False)
    misses = np.array([0, 1, -1, 2**40 + 1, keys[5] + 1], np.int64)
    misses = misses[~np.isin(misses, keys)]
    query = np.unique(np.concatenate([hits, misses, keys[:1], keys[-1:]]))
    tier = ColdTier.open(str(h5))
    try:
        found, got = tier.fetch(query)
        row_of = {int(k): i for i, k in enumerate(keys)}
        want_found = np.array([int(k) in row_of for k in query])
        np.testing.assert_array_equal(found, want_found)
        np.testing.assert_array_equal(got, vectors[[row_of[int(k)] for k in query[found]]])
        assert tier.fetch(np.empty(0, np.int64))[1].shape == (0, vectors.shape[1])
    finally:
        tier.close()


def test_convert_from_shared_hdf5_gives_self_contained_tables(shared, tmp_path):
    keys, vectors, _, h5 = shared
    convert(h5, tmp_path / "copy.h5")
    convert(h5, tmp_path / "copy_hps")
    with h5py.File(tmp_path / "copy.h5") as f:
        assert not f["vectors"].external and not f["keys"].external
    for path in (tmp_path / "copy.h5", tmp_path / "copy_hps"):
        t = read_hdf5_table(path) if path.suffix == ".h5" else read_hps_table(path)
        with t:
            np.testing.assert_array_equal(np.asarray(t.keys), keys)
            np.testing.assert_array_equal(np.asarray(t.vectors), vectors)


def test_plain_h5py_reads_it_with_the_origin_prefix(shared, tmp_path):
    keys, vectors, _, h5 = shared
    script = textwrap.dedent(f"""
        import h5py, numpy as np
        with h5py.File({str(h5)!r}) as f:
            np.save("v.npy", f["vectors"][...]); np.save("k.npy", f["keys"][...])
    """)
    env = dict(os.environ, HDF5_EXTFILE_PREFIX="${ORIGIN}")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path,
                   timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "k.npy"), keys)
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), vectors)


def test_errors_name_the_files(shared, tmp_path):
    keys, vectors, hps, h5 = shared
    # Unsorted HPS keys cannot hold an HDF5 table (rows in key order).
    rng = np.random.default_rng(3)
    order = rng.permutation(len(keys))
    write_hps_table(tmp_path / "shuffled", keys[order], vectors[order])
    with pytest.raises(TableFormatError, match="not sorted and unique.*write_hdf5_table"):
        write_hdf5_table_over_hps(tmp_path / "shuffled.h5", tmp_path / "shuffled")
    assert not (tmp_path / "shuffled.h5").exists()
    with pytest.raises(TableFormatError, match="dim"):
        write_hdf5_table_over_hps(tmp_path / "x.h5", hps, dim=vectors.shape[1] + 1)
    # A truncated data file, then a moved .h5: the reader says which file is wrong.
    moved = tmp_path / "moved.h5"
    os.link(h5, moved)
    with pytest.raises(TableFormatError,
                       match=r"moved.h5: /keys is stored in .*emb/key, which does not exist"):
        read_hdf5_table(moved)
    with open(hps / "emb_vector", "r+b") as f:
        f.truncate(vectors.nbytes - 4)
    with pytest.raises(TableFormatError, match=r"needs \d+ bytes at offset 0 of .*emb_vector"):
        read_hdf5_table(h5)


def test_empty_table_over_hps(tmp_path):
    write_hps_table(tmp_path / "e", np.empty(0, np.int64), np.empty((0, 5), np.float32))
    h5 = write_hdf5_table_over_hps(tmp_path / "e.h5", tmp_path / "e", dim=5)
    with read_hdf5_table(h5) as t:
        assert (t.num_rows, t.dim) == (0, 5)
    # The self-contained writer still works on the same data (one way per layout).
    write_hdf5_table(tmp_path / "e2.h5", np.empty(0, np.int64), np.empty((0, 5), np.float32))


# ---------------------------------------------------------------------------------------------
# the exporter's choice


keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")


def _two_table_model(rows_a: int, rows_b: int):
    a = keras.Input(shape=(2,), dtype="int64", name="a")
    b = keras.Input(shape=(1,), dtype="int64", name="b")
    x = keras.layers.Concatenate()([
        keras.layers.Flatten()(keras.layers.Embedding(rows_a, 4, name="tab_a")(a)),
        keras.layers.Flatten()(keras.layers.Embedding(rows_b, 3, name="tab_b")(b)),
    ])
    return keras.Model({"a": a, "b": b}, keras.layers.Dense(1, name="out")(x))


def test_external_export_writes_sorted_tables_once(tmp_path, monkeypatch, capsys):
    from keras_hps.cli import main
    from keras_hps.export import export_for_serving
    from keras_hps.parameter_server import ParameterServer

    keras.utils.set_random_seed(5)
    model = _two_table_model(50, 30)
    rng = np.random.default_rng(4)
    b_keys = rng.choice(2**50, 30, replace=False).astype(np.int64)  # unsorted: two copies
    repo = tmp_path / "repo"
    export_for_serving(model, repo, "m", tables="external", keys={"tab_b": b_keys})
    tdir = repo / "tables" / "m" / "1"
    with h5py.File(tdir / "tab_a.h5") as f:
        assert f["vectors"].external == [("tab_a/emb_vector", 0, 50 * 4 * 4)]
    with h5py.File(tdir / "tab_b.h5") as f:
        assert not f["vectors"].external
        np.testing.assert_array_equal(f["keys"][...], np.sort(b_keys))
    np.testing.assert_array_equal(np.fromfile(tdir / "tab_b" / "key", "<i8"), b_keys)
    # The repository moves as a whole (e.g. mounted elsewhere in a container): the .h5 names
    # its data files relative to itself. The parameter server reads both tables through
    # hps.json, from another working directory.
    moved = tmp_path / "mounted" / "repo"
    moved.parent.mkdir()
    os.rename(repo, moved)
    repo, tdir = moved, moved / "tables" / "m" / "1"
    monkeypatch.chdir(tmp_path)
    a_tab = model.get_layer("tab_a").get_weights()[0]
    b_tab = model.get_layer("tab_b").get_weights()[0]
    ps = ParameterServer(str(repo / "hps.json"))
    try:
        qa = np.array([[0, 49], [7, 7], [50, -1]], np.int64)
        want_a = np.where((qa >= 0) & (qa < 50), 1, 0)[..., None] * a_tab[np.clip(qa, 0, 49)]
        np.testing.assert_array_equal(ps.lookup("m", 0, qa), want_a)
        qb = np.array([b_keys[3], b_keys[3], 12345, b_keys[-1]], np.int64)
        want_b = np.stack([b_tab[3], b_tab[3], np.zeros(3, np.float32), b_tab[-1]])
        np.testing.assert_array_equal(ps.lookup("m", 1, qb), want_b)
    finally:
        ps.close()
    assert main(["inspect", str(repo)]) == 0
    out = capsys.readouterr().out
    size = os.path.getsize(tdir / "tab_a.h5") + 50 * 8 + 50 * 4 * 4
    assert f"0 tab_a: 50 rows x 4, {size / 1024:.1f} KiB" in out
