"""A writer of TensorFlow's checkpoint format (the "tensor bundle" that `SaveV2` writes).

A bundle `PREFIX` is two files:

- `PREFIX.data-00000-of-00001`: the tensors' bytes back to back (numeric tensors as their raw
  little-endian bytes; string tensors as varint64 lengths, a masked CRC32C of the lengths and
  the strings' bytes);
- `PREFIX.index`: a LevelDB-format table (sorted keys, prefix-compressed data blocks with
  restart points, each block followed by a type byte and a masked CRC32C; an empty metaindex
  block; an index block; a 48-byte footer). Key "" holds a `BundleHeaderProto`; each tensor's
  checkpoint key holds a `BundleEntryProto` (dtype, shape, offset, size, masked CRC32C of its
  bytes).

Written with the options TensorFlow's `BundleWriter` uses (no compression, 256 KiB blocks,
restart every 16 keys, no data alignment), the files are byte for byte the ones `SaveV2`
writes for the same tensors in the same order. The difference is speed: each tensor is
written in large pieces straight from its memory and its CRC32C comes from `google-crc32c`
(the CPU's CRC instruction) in a second thread, where `SaveV2` copies every byte through an
8 MiB buffer and checksums it in software.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from keras_hps.errors import ConfigError

# TensorFlow DataType enum values (tensorflow/core/framework/types.proto).
_DTYPES = {
    np.dtype(np.float32): 1, np.dtype(np.float64): 2, np.dtype(np.int32): 3,
    np.dtype(np.uint8): 4, np.dtype(np.int16): 5, np.dtype(np.int8): 6,
    np.dtype(np.complex64): 8, np.dtype(np.int64): 9, np.dtype(np.bool_): 10,
    np.dtype(np.complex128): 18, np.dtype(np.uint16): 17, np.dtype(np.float16): 19,
    np.dtype(np.uint32): 22, np.dtype(np.uint64): 23,
}
DT_STRING = 7

BLOCK_SIZE = 262144  # table::Options defaults, as TensorFlow's BundleWriter uses them
RESTART_INTERVAL = 16
_MAGIC = 0xDB4775248B80FB57
_MASK_DELTA = 0xA282EAD8
# Pieces written (and checksummed) at a time: large enough for few system calls, small
# enough to stay in the CPU caches between the copy and the CRC.
PIECE_BYTES = 16 << 20


def data_filename(prefix: str) -> str:
    """The data file of the single-shard bundle `prefix`."""
    return f"{prefix}.data-00000-of-00001"


def index_filename(prefix: str) -> str:
    """The index file of the bundle `prefix`."""
    return f"{prefix}.index"


def _crc32c() -> Any:
    try:
        import google_crc32c
    except ImportError as e:  # pragma: no cover - the dependency is declared
        raise ImportError("writing checkpoints needs google-crc32c: pip install google-crc32c") \
            from e
    return google_crc32c


def hardware_crc_available() -> bool:
    """Whether google-crc32c has its compiled implementation (the pure-Python one is far
    slower than TensorFlow's own writer)."""
    try:
        return _crc32c().implementation == "c"
    except ImportError:
        return False


def supports(dtype: Any) -> bool:
    """Whether tensors of NumPy `dtype` can be written (fixed-size numbers, bool, strings)."""
    dtype = np.dtype(dtype)
    return dtype in _DTYPES or dtype.kind in "OS"


def mask_crc(crc: int) -> int:
    """The masked CRC32C stored in bundles and table blocks (as LevelDB's crc32c::Mask)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class _Block:
    """A table block: entries `varint shared, varint unshared, varint value length, key
    suffix, value`; every `restart_interval` entries a full key, whose offsets end the block."""

    def __init__(self, restart_interval: int) -> None:
        self.restart_interval = restart_interval
        self.reset()

    def reset(self) -> None:
        self.buf = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""

    def empty(self) -> bool:
        return not self.buf

    def size_estimate(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.restart_interval:
            limit = min(len(key), len(self.last_key))
            while shared < limit and key[shared] == self.last_key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.counter = 0
        self.buf += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
        self.buf += key[shared:] + value
        self.last_key = key
        self.counter += 1

    def finish(self) -> bytes:
        return bytes(self.buf) + struct.pack(f"<{len(self.restarts) + 1}I", *self.restarts,
                                             len(self.restarts))


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    """A short key >= every key of a block ending at `start` and < `limit`."""
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n and start[i] < 0xFF and start[i] + 1 < limit[i]:
        return start[:i] + bytes([start[i] + 1])
    return start


def _short_successor(key: bytes) -> bytes:
    """A short key >= `key` (the index entry of the last block)."""
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


def build_table(entries: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A LevelDB-format table of `entries` (keys strictly increasing), as TensorFlow's
    `table::TableBuilder` writes it without compression."""
    out = bytearray()
    data, index = _Block(RESTART_INTERVAL), _Block(1)
    pending: tuple[int, int] | None = None
    crc = _crc32c()

    def write_block(block: _Block) -> tuple[int, int]:
        raw = block.finish()
        handle = (len(out), len(raw))
        out.extend(raw)
        out.append(0)  # block type: no compression
        out.extend(struct.pack("<I", mask_crc(crc.value(raw + b"\x00"))))
        block.reset()
        return handle

    def encode(handle: tuple[int, int]) -> bytes:
        return _varint(handle[0]) + _varint(handle[1])

    last_key = b""
    for n, (key, value) in enumerate(entries):
        if n and key <= last_key:
            raise ConfigError(f"table keys must increase: {key!r} after {last_key!r}")
        if n and len(key) + len(value) >= 2 * BLOCK_SIZE and not data.empty():
            pending = write_block(data)
        if pending is not None:
            index.add(_shortest_separator(last_key, key), encode(pending))
            pending = None
        last_key = key
        data.add(key, value)
        if data.size_estimate() >= BLOCK_SIZE:
            pending = write_block(data)
    if not data.empty():
        pending = write_block(data)
    metaindex = write_block(_Block(RESTART_INTERVAL))
    if pending is not None:
        index.add(_short_successor(last_key), encode(pending))
    index_handle = write_block(index)
    footer = (encode(metaindex) + encode(index_handle)).ljust(40, b"\x00")
    out.extend(footer + struct.pack("<II", _MAGIC & 0xFFFFFFFF, _MAGIC >> 32))
    return bytes(out)


def _string_record(values: np.ndarray) -> tuple[bytes, int]:
    """The data-file bytes of a string tensor and their (unmasked) CRC32C, as TensorFlow's
    WriteStringTensor makes them: varint64 lengths, the masked CRC32C of the lengths (each
    as a little-endian uint32, or uint64 past 4 GiB), then the strings."""
    crc = _crc32c()
    items = [v if isinstance(v, bytes) else str(v).encode() for v in values.reshape(-1)]
    lengths = b"".join(_varint(len(s)) for s in items)
    state = 0
    for s in items:
        state = crc.extend(state, struct.pack("<I" if len(s) <= 0xFFFFFFFF else "<Q", len(s)))
    masked = struct.pack("<I", mask_crc(state))
    state = crc.extend(state, masked)
    body = b"".join(items)
    state = crc.extend(state, body)
    return lengths + masked + body, state


def _as_array(key: str, value: Any) -> np.ndarray:
    if isinstance(value, bytes):
        return np.array(value, dtype=object)
    array = np.asarray(value)
    if not supports(array.dtype):
        raise ConfigError(f"checkpoint tensor {key!r}: dtype {array.dtype} cannot be written")
    return array


def write_tensor_bundle(prefix: str, tensors: Sequence[tuple[str, Any]], *,
                        progress: bool = False) -> None:
    """Write `tensors` (checkpoint key, value) as the single-shard checkpoint `prefix`.

    Values are NumPy arrays (numbers, bool, or bytes/str for string tensors) or `bytes`
    (a string scalar). The data file holds them in the given order. Both files are written
    under temporary names and renamed into place, the data file first, as `SaveV2` does.
    `tf.train.load_checkpoint`, `tf.saved_model.load` and TF Serving read the result.
    """
    crc = _crc32c()
    keys = [k for k, _ in tensors]
    if "" in keys:
        raise ConfigError('checkpoint keys must be non-empty ("" holds the bundle header)')
    if len(set(keys)) < len(keys):
        repeated = sorted(k for k, n in Counter(keys).items() if n > 1)
        raise ConfigError(f"checkpoint keys must be distinct; repeated: {repeated}")
    from tensorflow.core.protobuf import tensor_bundle_pb2

    arrays = [_as_array(k, v) for k, v in tensors]
    total = sum(a.nbytes for a in arrays if a.dtype.kind not in "OS")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"checkpoint {prefix}")
    suffix = f".tempstate{uuid.uuid4().hex}"
    data_tmp, index_tmp = data_filename(prefix) + suffix, index_filename(prefix) + suffix
    entries: list[tuple[bytes, bytes]] = []
    offset = 0
    try:
        with open(data_tmp, "wb", buffering=0) as f, \
                ThreadPoolExecutor(1, thread_name_prefix="keras-hps-crc32c") as checksummer:
            for key, array in zip(keys, arrays, strict=True):
                entry = tensor_bundle_pb2.BundleEntryProto()
                entry.shape.SetInParent()
                for d in array.shape:
                    entry.shape.dim.add(size=d)
                entry.offset = offset
                if array.dtype.kind in "OS":
                    entry.dtype = DT_STRING
                    record, state = _string_record(array)
                    _write_all(f, record)
                    size = len(record)
                else:
                    entry.dtype = _DTYPES[array.dtype]
                    state, size = _write_raw(f, array, checksummer, crc, bar)
                entry.size = size
                entry.crc32c = mask_crc(state)
                offset += size
                entries.append((key.encode(), entry.SerializeToString()))
        header = tensor_bundle_pb2.BundleHeaderProto(num_shards=1)
        header.version.producer = 1
        table = build_table([(b"", header.SerializeToString()), *sorted(entries)])
        os.replace(data_tmp, data_filename(prefix))
        with open(index_tmp, "wb") as f:
            f.write(table)
        os.replace(index_tmp, index_filename(prefix))
    except BaseException:
        for path in (data_tmp, index_tmp):
            if os.path.exists(path):
                os.remove(path)
        raise
    finally:
        if bar is not None:
            bar.close()


def _write_raw(f: Any, array: np.ndarray, checksummer: ThreadPoolExecutor, crc: Any,
               bar: Any) -> tuple[int, int]:
    """Write `array`'s bytes to `f` in pieces, straight from its memory, while the
    checksummer thread takes each piece's CRC32C. Returns (unmasked CRC32C, bytes)."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    state = [0]

    def extend(piece: np.ndarray) -> None:
        # google-crc32c takes only `bytes`: the copy is made here, beside the write (which
        # releases the GIL), not before it.
        state[0] = crc.extend(state[0], piece.tobytes())

    pending = []
    for start in range(0, flat.size, PIECE_BYTES):
        piece = flat[start:start + PIECE_BYTES]
        pending.append(checksummer.submit(extend, piece))
        _write_all(f, piece)
        if bar is not None:
            bar.update(piece.size)
        if len(pending) > 2:
            pending.pop(0).result()
    for future in pending:
        future.result()
    return state[0], int(flat.size)


def _write_all(f: Any, data: Any) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[f.write(view):]
