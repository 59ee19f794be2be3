"""TensorFlow 1 checkpoints (tensor bundles) read in plain Python and numpy, without TensorFlow.

A checkpoint `PREFIX` is `PREFIX.index` plus data shards `PREFIX.data-0000i-of-0000N`
(TensorFlow's `tensor_bundle.cc`):

- `.index` is a LevelDB-format table (an SSTable): data blocks of sorted key/value entries
  (keys prefix-compressed against the previous key, with restart points), an index block
  whose values are the data blocks' handles, and a 48-byte footer (metaindex handle, index
  handle, magic 0xdb4775248b80fb57). Every block is followed by a 5-byte trailer:
  compression type (TF writes 0, none) and the masked CRC32C of the block and that byte.
- The value of key "" is a `BundleHeaderProto` (num_shards, endianness); every other key is
  a tensor name whose value is a `BundleEntryProto` (dtype, shape, shard_id, offset, size,
  masked crc32c of the tensor's bytes). Both are decoded by the small protobuf reader here.
- A tensor is `size` raw little-endian bytes at `offset` in shard `shard_id`; `read` maps
  it with `np.memmap` (nothing is loaded until used) and checks its checksum.

Masked CRC32C (LevelDB's `crc32c::Mask`): `((crc >> 15) | (crc << 17)) + 0xa282ead8` mod 2^32.
Errors are `TFCheckpointError`s, one line naming the file (and the shard and tensor).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_LEN = 48  # two block handles padded to 40 bytes, then the 8-byte magic
TRAILER_LEN = 5  # compression type byte + masked crc32c
# TensorFlow's DataType enum -> numpy dtype (the ones a checkpoint of numbers holds)
DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8, 9: np.int64,
          10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}
DT_BFLOAT16 = 14


class TFCheckpointError(InputError):
    """A TensorFlow checkpoint that cannot be read (missing, truncated, corrupted, unsupported)."""


CRC_CHUNK = 16 << 20  # bytes copied out of a memory map at a time while checksumming


def masked_crc32c(data) -> int:
    """LevelDB/TensorFlow's masked CRC32C of `data` (bytes, or a uint8 array such as a memory map,
    read in chunks so a large tensor is never copied whole)."""
    import google_crc32c

    if isinstance(data, bytes):
        crc = google_crc32c.value(data)
    else:
        crc = 0
        for i in range(0, len(data), CRC_CHUNK):
            crc = google_crc32c.extend(crc, data[i:i + CRC_CHUNK].tobytes())
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------
# protobuf wire format: just enough to read BundleHeaderProto and BundleEntryProto
# ---------------------------------------------------------------------------
def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the base-128 varint at `buf[pos]`."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def proto_fields(buf: bytes) -> dict[int, list]:
    """A protobuf message's fields: field number -> list of values (ints for varint/fixed, bytes for
    length-delimited)."""
    out: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            v, pos = read_varint(buf, pos)
        elif wire == 1:
            v, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 5:
            v, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        elif wire == 2:
            n, pos = read_varint(buf, pos)
            v, pos = bytes(buf[pos:pos + n]), pos + n
            if pos > len(buf):
                raise ValueError("truncated field")
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.setdefault(number, []).append(v)
    return out


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: a decoded `BundleEntryProto`."""

    name: str
    dtype: int  # TensorFlow DataType enum
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None  # masked
    sliced: bool  # a partitioned variable (stored as slices): not supported

    @classmethod
    def parse(cls, name: str, buf: bytes) -> "TensorEntry":
        f = proto_fields(buf)
        shape: tuple[int, ...] = ()
        if 2 in f:
            dims = proto_fields(f[2][-1]).get(2, [])
            shape = tuple(int(proto_fields(d).get(1, [0])[-1]) for d in dims)
        one = lambda k, default=0: f.get(k, [default])[-1]  # noqa: E731
        return cls(name, int(one(1)), shape, int(one(3)), int(one(4)), int(one(5)), f.get(6, [None])[-1], 7 in f)


# ---------------------------------------------------------------------------
# the SSTable
# ---------------------------------------------------------------------------
def _block_entries(block: bytes):
    """(key, value) pairs of one table block (prefix-compressed keys; the restart array is skipped)."""
    if len(block) < 4:
        raise ValueError("block too short")
    n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 * (n_restarts + 1)
    if end < 0:
        raise ValueError("bad restart count")
    pos, key = 0, b""
    while pos < end:
        shared, pos = read_varint(block, pos)
        unshared, pos = read_varint(block, pos)
        vlen, pos = read_varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + vlen]
        pos += vlen
    if pos != end:
        raise ValueError("entries overrun the restart array")


def _read_block(data: bytes, handle: bytes) -> bytes:
    offset, p = read_varint(handle, 0)
    size, _ = read_varint(handle, p)
    if offset + size + TRAILER_LEN > len(data):
        raise ValueError("block beyond the end of the file (truncated?)")
    block = data[offset:offset + size]
    ctype, crc = struct.unpack_from("<BI", data, offset + size)
    if masked_crc32c(data[offset:offset + size + 1]) != crc:
        raise ValueError("block checksum mismatch (corrupted)")
    if ctype != 0:
        raise ValueError(f"compressed blocks (type {ctype}) are not supported; TensorFlow writes bundles "
                         "uncompressed")
    return block


def read_index(path: Path) -> dict[bytes, bytes]:
    """All key -> value entries of a tensor-bundle `.index` table."""
    data = path.read_bytes()
    if len(data) < FOOTER_LEN or struct.unpack_from("<Q", data, len(data) - 8)[0] != TABLE_MAGIC:
        raise ValueError("not a TensorFlow checkpoint index (no table magic at the end)")
    footer = data[-FOOTER_LEN:]
    _, p = read_varint(footer, 0)  # metaindex handle: offset, size (unused)
    _, p = read_varint(footer, p)
    index = _read_block(data, footer[p:])
    out: dict[bytes, bytes] = {}
    for _, handle in _block_entries(index):
        out.update(_block_entries(_read_block(data, handle)))
    return out


# ---------------------------------------------------------------------------
# the checkpoint
# ---------------------------------------------------------------------------
class TFCheckpoint:
    """A TensorFlow tensor bundle `prefix`: `names`, `entries[name]`, `read(name)` (a checked numpy array).

    Opening reads the index only and checks that every data shard it names exists with
    room for its tensors; tensors are read one by one, memory-mapped.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        index = Path(f"{self.prefix}.index")
        if not index.is_file():
            raise TFCheckpointError(f"{self.prefix}: not a TensorFlow checkpoint prefix (no {index.name})")
        try:
            table = read_index(index)
            header = proto_fields(table.pop(b"", b""))
            self.num_shards = int(header.get(1, [1])[-1])
            if header.get(2, [0])[-1] != 0:
                raise ValueError("big-endian checkpoints are not supported")
            self.entries = {k.decode(): TensorEntry.parse(k.decode(), v) for k, v in sorted(table.items())}
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            raise TFCheckpointError(f"{index}: unreadable checkpoint index ({e})") from None
        self.shards = [self.shard_path(i) for i in range(self.num_shards)]
        self._check_shards()

    def shard_path(self, i: int) -> Path:
        return Path(f"{self.prefix}.data-{i:05d}-of-{self.num_shards:05d}")

    def _check_shards(self) -> None:
        missing = [p for p in self.shards if not p.is_file()]
        if missing:
            others = sorted(self.prefix.parent.glob(f"{self.prefix.name}.data-*-of-*"))
            found = {p.name.rsplit("-of-", 1)[-1] for p in others} - {f"{self.num_shards:05d}"}
            also = f"; found shards of {int(min(found))} instead" if found else ""
            raise TFCheckpointError(f"{missing[0]}: missing data shard ({len(missing)} of {self.num_shards} shards "
                                    f"the index names are absent{also})")
        ends: dict[int, tuple[int, str]] = {}
        for e in self.entries.values():
            if e.shard_id >= self.num_shards:
                raise TFCheckpointError(f"{self.prefix}.index: tensor {e.name} names shard {e.shard_id} of "
                                        f"{self.num_shards}")
            if e.offset + e.size > ends.get(e.shard_id, (0, ""))[0]:
                ends[e.shard_id] = (e.offset + e.size, e.name)
        for i, (end, name) in ends.items():
            have = self.shards[i].stat().st_size
            if have < end:
                raise TFCheckpointError(f"{self.shards[i]}: truncated shard ({have} bytes, tensor {name} ends at "
                                        f"{end})")

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str, *, verify: bool = True) -> np.ndarray:
        """Tensor `name` as a read-only memory-mapped numpy array (its checksum checked first)."""
        e = self.entries.get(name)
        if e is None:
            raise TFCheckpointError(f"{self.prefix}: no tensor {name} in the checkpoint")
        where = f"{self.shards[e.shard_id]}: tensor {name}"
        if e.sliced:
            raise TFCheckpointError(f"{where}: partitioned (sliced) variables are not supported")
        if e.dtype == DT_BFLOAT16:
            dtype = np.dtype(np.uint16)  # raw bits; `bfloat16_to_float32` widens them
        elif e.dtype in DTYPES:
            dtype = np.dtype(DTYPES[e.dtype])
        else:
            raise TFCheckpointError(f"{where}: unsupported dtype (TensorFlow DataType {e.dtype})")
        count = int(np.prod(e.shape, dtype=np.int64))
        if count * dtype.itemsize != e.size:
            raise TFCheckpointError(f"{where}: {e.size} bytes stored for shape {e.shape} of {dtype}")
        mm = self._map(e.shard_id)
        raw = mm[e.offset:e.offset + e.size]
        if verify and e.crc32c is not None and masked_crc32c(raw) != e.crc32c:
            raise TFCheckpointError(f"{where}: checksum mismatch (the shard is corrupted; download it again)")
        arr = raw.view(dtype).reshape(e.shape)
        return bfloat16_to_float32(arr) if e.dtype == DT_BFLOAT16 else arr

    def _map(self, shard: int) -> np.ndarray:
        """The shard memory-mapped (not cached: the mapping, and the pages read through it, are
        released when the last array read from it is, so converting a model never holds it all)."""
        p = self.shards[shard]
        return np.memmap(p, dtype=np.uint8, mode="r") if p.stat().st_size else np.zeros(0, np.uint8)


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 bit patterns -> float32 (the high half of a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
