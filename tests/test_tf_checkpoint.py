"""igpt_cli.model.tf_checkpoint: TensorFlow tensor bundles read without TensorFlow.

The fixtures in tests/fixtures/tf/ were written by real TensorFlow 2.21 (tools/make_tf_fixtures.py):
two partial SaveV2 bundles merged with MergeV2Checkpoints, so every checkpoint has two data shards.
That the values read are TensorFlow's is checked end to end in test_convert.py (our forward on them
equals TensorFlow's forward, saved beside them)."""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from igpt_cli.model.tf_checkpoint import (FOOTER_LEN, TFCheckpoint, TFCheckpointError, masked_crc32c, proto_fields,
                                          read_varint)

FIXTURES = Path(__file__).parent / "fixtures" / "tf"
AR = FIXTURES / "ar" / "model.ckpt-7"


def copy_checkpoint(tmp: Path, src: Path = AR) -> Path:
    """The checkpoint's files copied into `tmp`: the new prefix."""
    for p in src.parent.glob(f"{src.name}.*"):
        shutil.copy(p, tmp / p.name)
    return tmp / src.name


def test_varint_and_protobuf_fields():
    assert read_varint(bytes([0xAC, 0x02]), 0) == (300, 2)
    # field 1 varint 150, field 2 bytes "ab", field 6 fixed32
    msg = bytes([0x08, 0x96, 0x01, 0x12, 0x02]) + b"ab" + bytes([0x35]) + struct.pack("<I", 0xDEADBEEF)
    assert proto_fields(msg) == {1: [150], 2: [b"ab"], 6: [0xDEADBEEF]}
    with pytest.raises(ValueError):
        read_varint(bytes([0x80]), 0)


def test_masked_crc32c_matches_leveldb():
    # crc32c("123456789") = 0xE3069283 (the standard check value), masked as LevelDB does
    crc = 0xE3069283
    assert masked_crc32c(b"123456789") == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
    assert masked_crc32c(np.frombuffer(b"123456789", np.uint8)) == masked_crc32c(b"123456789")


def test_reads_the_two_shard_bundle_tensorflow_wrote():
    ckpt = TFCheckpoint(AR)
    assert ckpt.num_shards == 2 and all(p.is_file() for p in ckpt.shards)
    assert {e.shard_id for e in ckpt.entries.values()} == {0, 1}
    assert ckpt.shape("model/h0/attn/q_proj") == (2, 8, 16)
    assert ckpt.shape("model/wte") == (512, 16) and "model/wpe/Adam_1" in ckpt
    assert int(ckpt.read("global_step")) == 7
    assert np.isclose(float(ckpt.read("beta1_power")), 0.9)
    wte = ckpt.read("model/wte")
    assert wte.dtype == np.float32 and isinstance(wte, np.memmap) and not wte.flags.writeable


def test_missing_index(tmp_path):
    with pytest.raises(TFCheckpointError, match="no model.ckpt-7.index"):
        TFCheckpoint(tmp_path / "model.ckpt-7")


def test_missing_shard_named(tmp_path):
    prefix = copy_checkpoint(tmp_path)
    Path(f"{prefix}.data-00001-of-00002").unlink()
    with pytest.raises(TFCheckpointError, match=r"data-00001-of-00002: missing data shard"):
        TFCheckpoint(prefix)


def test_wrong_shard_count_named(tmp_path):
    prefix = copy_checkpoint(tmp_path)
    for i in range(2):
        Path(f"{prefix}.data-0000{i}-of-00002").rename(f"{prefix}.data-0000{i}-of-00003")
    with pytest.raises(TFCheckpointError, match="found shards of 3 instead"):
        TFCheckpoint(prefix)


def test_truncated_shard_named(tmp_path):
    prefix = copy_checkpoint(tmp_path)
    shard = Path(f"{prefix}.data-00000-of-00002")
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(TFCheckpointError, match=r"data-00000-of-00002: truncated shard .*tensor "):
        TFCheckpoint(prefix)


def test_corrupted_tensor_named_with_its_shard(tmp_path):
    prefix = copy_checkpoint(tmp_path)
    ckpt = TFCheckpoint(prefix)
    e = ckpt.entries["model/wte"]
    shard = ckpt.shards[e.shard_id]
    data = bytearray(shard.read_bytes())
    data[e.offset + 10] ^= 0xFF
    shard.write_bytes(bytes(data))
    ckpt = TFCheckpoint(prefix)
    with pytest.raises(TFCheckpointError, match=rf"{shard.name}: tensor model/wte: checksum mismatch"):
        ckpt.read("model/wte")
    ckpt.read("model/wpe")  # the others are intact


def _index_block(index: bytes) -> tuple[int, int]:
    """(offset, size) of the index block (its 5-byte trailer follows: compression type, masked crc)."""
    footer = index[-FOOTER_LEN:]
    _, p = read_varint(footer, 0)  # metaindex handle
    _, p = read_varint(footer, p)
    off, p = read_varint(footer, p)
    return off, read_varint(footer, p)[0]


def test_corrupted_or_compressed_index(tmp_path):
    prefix = copy_checkpoint(tmp_path)
    index = Path(f"{prefix}.index")
    good = index.read_bytes()
    bad = bytearray(good)
    bad[5] ^= 0xFF  # inside the first data block
    index.write_bytes(bytes(bad))
    with pytest.raises(TFCheckpointError, match="unreadable checkpoint index .*checksum mismatch"):
        TFCheckpoint(prefix)
    # the index block marked snappy-compressed (type 1), with a valid checksum: refused, said why
    off, size = _index_block(good)
    t = off + size
    snappy = bytearray(good)
    snappy[t] = 1
    snappy[t + 1:t + 5] = struct.pack("<I", masked_crc32c(bytes(snappy[off:t + 1])))
    index.write_bytes(bytes(snappy))
    with pytest.raises(TFCheckpointError, match="compressed blocks"):
        TFCheckpoint(prefix)
    index.write_bytes(b"not a table" * 10)
    with pytest.raises(TFCheckpointError, match="no table magic"):
        TFCheckpoint(prefix)
