"""HPS table directories and keras-hps HDF5 tables: round trips, streaming, atomicity, errors."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from keras_hps import formats
from keras_hps.errors import TableFormatError
from keras_hps.formats import (
    open_table,
    read_hdf5_table,
    read_hps_table,
    table_header,
    write_hdf5_table,
    write_hps_table,
)

EDGE_KEYS = np.array([0, -1, 1, np.iinfo(np.int64).min, np.iinfo(np.int64).max, -(2**40)])


def random_table(rng: np.random.Generator, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique int64 keys in random order (with 0, negatives and the int64 extremes)."""
    keys = np.unique(np.concatenate([EDGE_KEYS, rng.integers(-(2**62), 2**62, n)]))
    keys = rng.permutation(keys)[:n]
    return keys, rng.standard_normal((len(keys), dim)).astype(np.float32)


def as_dict(keys, vectors) -> dict[int, np.ndarray]:
    return {int(k): np.asarray(v) for k, v in zip(np.asarray(keys), np.asarray(vectors),
                                                  strict=True)}


def assert_same_table(table, keys, vectors) -> None:
    got = as_dict(table.keys[:], table.vectors[:])
    want = as_dict(keys, vectors)
    assert got.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)


def test_hps_round_trip_keeps_order_and_bytes(tmp_path):
    rng = np.random.default_rng(1)
    keys, vecs = random_table(rng, 3000, 7)
    write_hps_table(tmp_path / "t", keys, vecs)
    raw_keys = np.fromfile(tmp_path / "t" / "key", dtype="<i8")
    raw_vecs = np.fromfile(tmp_path / "t" / "emb_vector", dtype="<f4").reshape(-1, 7)
    np.testing.assert_array_equal(raw_keys, keys)  # HPS files keep the given row order
    np.testing.assert_array_equal(raw_vecs, vecs)
    for dim in (None, 7):
        with read_hps_table(tmp_path / "t", dim) as t:
            assert (t.kind, t.dim, t.num_rows) == ("hps", 7, len(keys))
            assert isinstance(t.vectors, np.memmap)
            np.testing.assert_array_equal(t.keys, keys)
            np.testing.assert_array_equal(t.vectors, vecs)
            rows = rng.integers(0, len(keys), 500)
            np.testing.assert_array_equal(t.read_rows(rows), vecs[rows])


def test_hdf5_round_trip_sorted_chunked_and_memory_mapped(tmp_path):
    rng = np.random.default_rng(2)
    keys, vecs = random_table(rng, 5000, 33)
    write_hdf5_table(tmp_path / "t.h5", keys, vecs)
    with h5py.File(tmp_path / "t.h5") as f:
        assert f.attrs["format"] == "keras-hps-table"
        assert f.attrs["format_version"] == formats.FORMAT_VERSION
        assert f.attrs["dim"] == 33
        assert f["vectors"].chunks is not None and f["vectors"].chunks[1] == 33
        assert f["vectors"].chunks[0] < 5000
        np.testing.assert_array_equal(f["keys"][:], np.sort(keys))
    with read_hdf5_table(tmp_path / "t.h5") as t:
        assert (t.kind, t.dim, t.num_rows) == ("hdf5", 33, len(keys))
        assert isinstance(t.vectors, np.memmap) and isinstance(t.keys, np.memmap)
        assert_same_table(t, keys, vecs)
        order = np.argsort(keys)
        rows = rng.integers(0, len(keys), 700)
        np.testing.assert_array_equal(t.read_rows(rows), vecs[order][rows])
    assert table_header(tmp_path / "t.h5") == (len(keys), 33)


@pytest.mark.parametrize("first", ["hps", "hdf5"])
def test_round_trip_between_formats(tmp_path, first):
    rng = np.random.default_rng(3)
    keys, vecs = random_table(rng, 2000, 16)
    a = tmp_path / ("a.h5" if first == "hdf5" else "a")
    b = tmp_path / ("b" if first == "hdf5" else "b.h5")
    (write_hdf5_table if first == "hdf5" else write_hps_table)(a, keys, vecs)
    with open_table(a) as t:
        (write_hps_table if first == "hdf5" else write_hdf5_table)(b, t.keys, t.vectors)
    with open_table(b) as t2:
        assert t2.kind == ("hps" if first == "hdf5" else "hdf5")
        assert_same_table(t2, keys, vecs)
    c = tmp_path / ("c.h5" if first == "hdf5" else "c")
    with open_table(b) as t2:
        (write_hdf5_table if first == "hdf5" else write_hps_table)(c, t2.keys, t2.vectors)
    with open_table(c) as t3:
        assert_same_table(t3, keys, vecs)


def test_streamed_writes_in_many_blocks(tmp_path, monkeypatch):
    """Blocks smaller than the table: the permuted (sorting) and in-order paths both stream."""
    monkeypatch.setattr(formats.table, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(formats.io, "PERMUTED_BLOCK_BYTES", 8192)
    monkeypatch.setattr(formats.io, "SWEEP_BYTES", 2048)
    rng = np.random.default_rng(4)
    keys, vecs = random_table(rng, 3001, 12)
    write_hps_table(tmp_path / "t", keys, vecs)
    with read_hps_table(tmp_path / "t") as t:  # memory-mapped, out of key order: swept gather
        write_hdf5_table(tmp_path / "t.h5", t.keys, t.vectors, chunk_rows=7)
        sorted_keys, view = t.in_key_order()  # what convert does
        write_hdf5_table(tmp_path / "v.h5", sorted_keys, view)
    with read_hdf5_table(tmp_path / "v.h5") as t:
        assert_same_table(t, keys, vecs)
    with read_hdf5_table(tmp_path / "t.h5") as t:
        assert_same_table(t, keys, vecs)
        blocks = list(t.iter_blocks(100))
        assert len(blocks) == 31
        np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), np.sort(keys))


def test_empty_tables_round_trip(tmp_path):
    empty_k, empty_v = np.empty(0, np.int64), np.empty((0, 4), np.float32)
    write_hps_table(tmp_path / "e", empty_k, empty_v)
    write_hdf5_table(tmp_path / "e.h5", empty_k, empty_v)
    with read_hps_table(tmp_path / "e", 4) as t:
        assert t.num_rows == 0 and t.vectors.shape == (0, 4)
    with read_hdf5_table(tmp_path / "e.h5") as t:
        assert t.num_rows == 0 and t.dim == 4
    with pytest.raises(TableFormatError, match="dim cannot be inferred"):
        read_hps_table(tmp_path / "e")


def test_writes_are_atomic_and_replace_existing(tmp_path):
    rng = np.random.default_rng(5)
    k1, v1 = random_table(rng, 100, 4)
    k2, v2 = random_table(rng, 50, 4)
    for path, write in ((tmp_path / "t", write_hps_table), (tmp_path / "t.h5", write_hdf5_table)):
        write(path, k1, v1)
        write(path, k2, v2)
        with open_table(path) as t:
            assert_same_table(t, k2, v2)
        with pytest.raises(FileExistsError):
            write(path, k1, v1, overwrite=False)

        class Broken:
            shape = v1.shape
            dtype = np.dtype(np.float32)

            def __getitem__(self, item):
                raise OSError("disk on fire")

        with pytest.raises(OSError, match="disk on fire"):
            write(path, k1, Broken())
        with open_table(path) as t:  # the old table is untouched
            assert_same_table(t, k2, v2)
    assert sorted(os.listdir(tmp_path)) == ["t", "t.h5"]  # no temporary names left behind


def test_duplicates_error_or_last_wins(tmp_path):
    keys = np.array([5, -3, 5, 0, -3, 9])
    vecs = np.arange(12, dtype=np.float32).reshape(6, 2)
    for write, path in ((write_hps_table, tmp_path / "w"), (write_hdf5_table, tmp_path / "w.h5")):
        with pytest.raises(TableFormatError, match="duplicate key"):
            write(path, keys, vecs)
        write(path, keys, vecs, on_duplicate="last")
        with open_table(path) as t:
            got = as_dict(t.keys[:], t.vectors[:])
        assert sorted(got) == [-3, 0, 5, 9]
        np.testing.assert_array_equal(got[5], vecs[2])
        np.testing.assert_array_equal(got[-3], vecs[4])
    # an HPS directory written by someone else, with duplicates
    d = tmp_path / "dup"
    d.mkdir()
    keys.astype("<i8").tofile(d / "key")
    vecs.tofile(d / "emb_vector")
    with pytest.raises(TableFormatError, match=r"dup.*key.*duplicate key (5|-3)"):
        read_hps_table(d)
    with read_hps_table(d, on_duplicate="last") as t:
        np.testing.assert_array_equal(t.keys, [-3, 0, 5, 9])
        np.testing.assert_array_equal(t.vectors[:], vecs[[4, 3, 2, 5]])
        np.testing.assert_array_equal(t.read_rows(np.array([2, 0])), vecs[[2, 4]])


def test_hps_size_errors_name_the_file(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "key").write_bytes(b"\0" * 20)
    (d / "emb_vector").write_bytes(b"\0" * 40)
    with pytest.raises(TableFormatError, match=r"bad/key: size 20 bytes is not a multiple of 8"):
        read_hps_table(d)
    (d / "key").write_bytes(np.arange(3, dtype="<i8").tobytes())
    (d / "emb_vector").write_bytes(b"\0" * (3 * 4 * 4 + 4))
    with pytest.raises(TableFormatError, match=r"bad/emb_vector: size 52 bytes does not match"):
        read_hps_table(d, 4)
    with pytest.raises(TableFormatError, match=r"bad/emb_vector: size 52 bytes is not 3 keys"):
        read_hps_table(d)
    (d / "emb_vector").unlink()
    with pytest.raises(TableFormatError, match="missing its 'emb_vector' file"):
        read_hps_table(d)
    with pytest.raises(TableFormatError, match="not found"):
        read_hps_table(tmp_path / "nowhere")


def test_hdf5_that_is_not_a_keras_hps_table(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f["keys"] = np.arange(3)
        f["vectors"] = np.zeros((3, 2), np.float32)
    with pytest.raises(TableFormatError, match=r"other\.h5: not a keras-hps table"):
        read_hdf5_table(p)
    with h5py.File(p, "a") as f:
        f.attrs["format"] = "keras-hps-table"
        f.attrs["format_version"] = 1
        f.attrs["dim"] = 3
    with pytest.raises(TableFormatError, match="attribute dim=3"):
        read_hdf5_table(p)
    with h5py.File(p, "a") as f:
        f.attrs["dim"] = 2
        del f["keys"]
        f["keys"] = np.array([3, 1, 2])
    with pytest.raises(TableFormatError, match="keys are not sorted"):
        read_hdf5_table(p)
    with h5py.File(p, "a") as f:
        del f["keys"]
        f["keys"] = np.array([1, 2, 2])
    with pytest.raises(TableFormatError, match="duplicate key 2"):
        read_hdf5_table(p)
    with h5py.File(p, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(TableFormatError, match="format_version 99"):
        read_hdf5_table(p)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not hdf5")
    with pytest.raises(TableFormatError, match=r"junk\.h5: not an HDF5 file"):
        read_hdf5_table(junk)


def test_hdf5_with_compression_is_read_through_h5py(tmp_path):
    rng = np.random.default_rng(6)
    keys = np.sort(rng.choice(10**6, 400, replace=False))
    vecs = rng.standard_normal((400, 8)).astype(np.float32)
    p = tmp_path / "gz.h5"
    with h5py.File(p, "w") as f:
        f.attrs.update({"format": "keras-hps-table", "format_version": 1, "dim": 8})
        f.create_dataset("keys", data=keys, compression="gzip")
        f.create_dataset("vectors", data=vecs, chunks=(16, 8), compression="gzip")
    with read_hdf5_table(p) as t:
        assert not isinstance(t.vectors, np.ndarray)  # no memory map for filtered data
        rows = rng.integers(0, 400, 300)
        np.testing.assert_array_equal(t.read_rows(rows), vecs[rows])


def test_writer_input_errors(tmp_path):
    with pytest.raises(TableFormatError, match="1-D integer"):
        write_hps_table(tmp_path / "x", np.array([1.0, 2.0]), np.zeros((2, 2)))
    with pytest.raises(TableFormatError, match="2 keys but 3 vector rows"):
        write_hdf5_table(tmp_path / "x.h5", np.array([1, 2]), np.zeros((3, 2)))
    with pytest.raises(TableFormatError, match=r"\[rows, dim\]"):
        write_hdf5_table(tmp_path / "x.h5", np.array([1, 2]), np.zeros(2))
    assert not os.listdir(tmp_path)


def test_hdf5_chunks_not_in_row_order_go_through_h5py(tmp_path, monkeypatch):
    """Storage whose chunks are not one run of bytes: written and read through h5py."""
    monkeypatch.setattr(formats.hdf5_storage, "linear_chunks_offset", lambda dset: None)
    rng = np.random.default_rng(7)
    keys, vecs = random_table(rng, 1500, 5)
    write_hdf5_table(tmp_path / "t.h5", keys, vecs, chunk_rows=64)
    with read_hdf5_table(tmp_path / "t.h5") as t:
        assert isinstance(t.vectors, h5py.Dataset)
        assert_same_table(t, keys, vecs)
        order = np.argsort(keys)
        rows = rng.integers(0, len(keys), 200)
        np.testing.assert_array_equal(t.read_rows(rows), vecs[order][rows])
