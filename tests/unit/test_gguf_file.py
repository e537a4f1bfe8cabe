"""The GGUF reader: metadata as the gguf package reads it, tensors as views, and every kind of bad file."""

from __future__ import annotations

import errno
import logging
import mmap
import struct
import sys

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFReader, GGUFWriter, quants

from loaders.gguf.errors import GGUFError
from loaders.gguf.reader import GGUFFile
from loaders.gguf.state_dict import load_state_dict
from loaders.quant.weight import GGMLTensor


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def raw_gguf(tensors, data: bytes, version: int = 3, kv: bytes = b"", n_kv: int = 0) -> bytes:
    """A GGUF built byte by byte, so each header field can be made wrong on purpose.
    ``tensors`` holds (name, ggml-order dims, raw type, offset) tuples."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), n_kv) + kv
    for name, dims, qtype, offset in tensors:
        head += _s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        head += struct.pack("<IQ", qtype, offset)
    head += b"\0" * (-len(head) % 32)
    return head + data


def write(tmp_path, content: bytes, name: str = "model.gguf"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def expect_error(path, *fragments: str) -> str:
    with pytest.raises(GGUFError) as info:
        GGUFFile(path)
    message = str(info.value)
    assert path.name in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_reads_metadata_like_gguf_reader(tmp_path):
    path = tmp_path / "meta.gguf"
    w = GGUFWriter(str(path), arch="qwen2vl")
    w.add_uint32("qwen2vl.block_count", 28)
    w.add_float32("qwen2vl.rope.freq_base", 1e6)
    w.add_bool("flag", True)
    w.add_array("qwen2vl.rope.dimension_sections", [16, 24, 24, 0])
    tokens = [f"tok{i}" for i in range(5000)] + ["你好", "🙂"]
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.merges", ["a b", "Ġ t"])
    w.add_tensor("blk.0.attn_q.weight", np.arange(64 * 32, dtype=np.float32).reshape(64, 32))
    w.add_tensor("blk.0.attn_k.weight", np.ones((3, 32), dtype=np.float16))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()

    f = GGUFFile(path)
    ref = GGUFReader(str(path))
    assert f.architecture == "qwen2vl"
    assert f.get("qwen2vl.block_count") == 28 and f.get("flag") is True
    assert f.get("qwen2vl.rope.freq_base") == pytest.approx(1e6)
    assert list(f.get("qwen2vl.rope.dimension_sections")) == [16, 24, 24, 0]
    assert f.get("tokenizer.ggml.tokens").tolist() == tokens
    assert f.get("tokenizer.ggml.merges")[1] == "Ġ t"
    for t in ref.tensors:
        info = f.tensors[t.name]
        assert info.shape == tuple(reversed([int(d) for d in t.shape]))
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes
    q = f.raw("blk.0.attn_q.weight").view(torch.float32).reshape(64, 32)
    assert torch.equal(q, torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32))


def test_not_a_gguf(tmp_path):
    expect_error(write(tmp_path, b"\x00" * 100), "not a GGUF file")
    safetensors = struct.pack("<Q", 20) + b'{"__metadata__":{}}' + b" " * 20
    expect_error(write(tmp_path, safetensors, "model.safetensors.gguf"), "not a GGUF file", "safetensors")
    expect_error(write(tmp_path, b"GGUF", "tiny.gguf"), "not a GGUF file")


@pytest.mark.parametrize("version", [1, 4, 99])
def test_unsupported_version(tmp_path, version):
    expect_error(write(tmp_path, raw_gguf([], b"", version=version)), f"unsupported GGUF version {version}")


def test_big_endian(tmp_path):
    content = b"GGUF" + struct.pack(">IQQ", 3, 0, 0)
    expect_error(write(tmp_path, content), "big-endian")


def test_truncated_download_says_how_much_is_missing(tmp_path):
    data = bytes(34 * 4 * 2)  # two Q8_0 tensors of 4 blocks
    full = raw_gguf([("a", [128], T.Q8_0, 0), ("b", [128], T.Q8_0, 160)], data + bytes(26))
    expect_error(write(tmp_path, full[:-50]), "truncated", "bytes are missing", "incomplete download")
    message = expect_error(write(tmp_path, full[:-50]), "truncated")
    missing = (160 + 136) - (len(full) - 50 - (len(full) - len(data) - 26))
    assert f"{missing:,} bytes are missing" in message


def test_truncated_header(tmp_path):
    full = raw_gguf([("a", [32], T.F32, 0)], bytes(128))
    expect_error(write(tmp_path, full[:40]), "truncated header")


def test_size_not_matching_shape_and_type(tmp_path):
    # "a" claims 256 Q8_0 elements (272 bytes) but "b" starts 160 bytes after it.
    content = raw_gguf([("a", [256], T.Q8_0, 0), ("b", [128], T.Q8_0, 160)], bytes(272))
    expect_error(write(tmp_path, content), "'a'", "does not match its shape and type")


def test_absurd_dimensions(tmp_path):
    content = raw_gguf([("a", [1 << 45, 1 << 20], T.F32, 0)], bytes(64))
    expect_error(write(tmp_path, content), "'a'", "absurd dimensions")
    content = raw_gguf([("a", [32] * 7, T.F32, 0)], bytes(64))
    expect_error(write(tmp_path, content), "'a'", "7 dimensions")
    # No elements (a 0 among the dimensions), yet beyond any shape torch can make (found by fuzzing).
    for dims, qtype in (([0, 1 << 40, 1 << 40, 1 << 40], T.F32), ([256, 0, 1 << 40, 1 << 40], T.Q6_K)):
        expect_error(write(tmp_path, raw_gguf([("a", dims, qtype, 0)], b"")), "'a'", "absurd dimensions")


def test_marker_of_no_elements_loads_whatever_its_type(tmp_path, caplog):
    # Edit-2511's zero-element marker, its type id damaged into one gguf-py alone reads: nothing to decode.
    f = GGUFFile(write(tmp_path, raw_gguf([("__index_timestep_zero__", [0], T.IQ2_XXS, 0)], b"")))
    with caplog.at_level(logging.WARNING):
        sd = load_state_dict(f)
    assert sd["__index_timestep_zero__"].numel() == 0 and "dequantizer" not in caplog.text


def test_unknown_quant_type(tmp_path):
    content = raw_gguf([("blk.0.ffn_up.weight", [32], 77, 0)], bytes(64))
    expect_error(write(tmp_path, content), "'blk.0.ffn_up.weight'", "unknown quant type 77")


def test_row_not_whole_blocks(tmp_path):
    content = raw_gguf([("a", [100], T.Q4_K, 0)], bytes(256))
    expect_error(write(tmp_path, content), "not a multiple", "block size 256")


def test_other_types_are_converted_once_with_a_note(tmp_path, caplog):
    qtype = T.TQ2_0  # no torch dequantizer: read once by gguf-py
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(4, type_size), dtype=np.uint8)
    blocks[:, -2:] = np.full(4, 0.01, dtype=np.float16).view(np.uint8).reshape(4, 2)
    data = blocks.tobytes() + bytes(-len(blocks.tobytes()) % 32)
    # A quantized matrix stays quantized; a quantized vector (a bias or norm) is converted at load.
    content = raw_gguf([("w", [block_size * 2, 2], qtype, 0), ("q", [32, 2], T.Q8_0, len(data)),
                        ("v", [32], T.Q8_0, len(data) + 96)], data + bytes(96) + bytes(34))
    f = GGUFFile(write(tmp_path, content))
    with caplog.at_level(logging.WARNING):
        sd = load_state_dict(f)
    assert "TQ2_0" in caplog.text and "memory" in caplog.text
    expected = quants.dequantize(blocks.reshape(2, -1), qtype).astype(np.float32)
    assert sd["w"].dtype == torch.bfloat16 and not isinstance(sd["w"], GGMLTensor)
    assert torch.equal(sd["w"], torch.from_numpy(expected).to(torch.bfloat16))
    assert isinstance(sd["q"], GGMLTensor)
    assert not isinstance(sd["v"], GGMLTensor) and sd["v"].shape == (32,) and sd["v"].dtype == torch.bfloat16


def test_quantized_tensors_are_views_of_the_file(tmp_path):
    content = raw_gguf([("q", [64, 2], T.Q8_0, 0)], bytes(136))
    f = GGUFFile(write(tmp_path, content))
    t = load_state_dict(f)["q"]
    assert isinstance(t, GGMLTensor) and t.qshape == (2, 64) and t.fmt.qtype == T.Q8_0
    assert t.untyped_storage().data_ptr() == f.raw("q").untyped_storage().data_ptr()


# --- damaged headers (values of the wrong type, counts past the file, repeats) ----------------------

def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def nested(depth: int) -> bytes:
    inner = struct.pack("<IQ", 4, 1) + struct.pack("<I", 7)  # an array of one uint32
    for _ in range(depth - 1):
        inner = struct.pack("<IQ", 9, 1) + inner
    return inner


@pytest.mark.parametrize("entry, fragments", [
    (kv("deep", 9, nested(1000)), ("nested more than",)),
    (kv("tokens", 9, struct.pack("<IQ", 8, 2 ** 40)), ("claims 1,099,511,627,776 elements",)),
    (kv("tokens", 9, struct.pack("<IQ", 8, 2 ** 63)), ("elements",)),
    (kv("tokens", 9, struct.pack("<IQ", 8, 1) + struct.pack("<Q", 2 ** 63)), ("string array runs past",)),
    (kv("many", 9, struct.pack("<IQ", 9, 2 ** 62)), ("elements",)),
    (kv("general.alignment", 8, _s("32")), ("general.alignment is str", "not an integer")),
    (kv("general.alignment", 6, struct.pack("<f", float("nan"))), ("general.alignment is float",)),
    (kv("general.alignment", 9, struct.pack("<IQ", 4, 1) + struct.pack("<I", 32)), ("general.alignment is",)),
    (kv("general.alignment", 4, struct.pack("<I", 24)), ("not a power of two",)),
], ids=["nested", "count-2e40", "count-2e63", "string-2e63", "arrays-2e62", "align-str", "align-nan",
        "align-array", "align-24"])
def test_damaged_metadata_is_refused_quickly(tmp_path, entry, fragments):
    content = raw_gguf([("a", [32], T.F32, 0)], bytes(128), kv=entry, n_kv=1)
    expect_error(write(tmp_path, content), *fragments)


def test_repeated_key_and_tensor_name_and_misaligned_offset(tmp_path):
    twice = kv("k", 4, struct.pack("<I", 1)) * 2
    expect_error(write(tmp_path, raw_gguf([("a", [32], T.F32, 0)], bytes(128), kv=twice, n_kv=2)), "'k' appears twice")
    expect_error(write(tmp_path, raw_gguf([("a", [8], T.F32, 0), ("a", [8], T.F32, 32)], bytes(64))),
                 "'a' appears twice")
    expect_error(write(tmp_path, raw_gguf([("a", [8], T.F32, 4)], bytes(64))), "offset 4", "alignment 32")


def test_string_values_of_the_wrong_type(tmp_path):
    entry = kv("general.architecture", 9, struct.pack("<IQ", 4, 1) + struct.pack("<I", 1))
    path = write(tmp_path, raw_gguf([("a", [32], T.F32, 0)], bytes(128), kv=entry, n_kv=1))
    with pytest.raises(GGUFError) as info:
        GGUFFile(path).architecture
    assert "general.architecture is" in str(info.value) and "not a string" in str(info.value)


def test_only_regular_files_are_opened(tmp_path):
    import os
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    expect_error(fifo, "not a regular file")
    (tmp_path / "folder.gguf").mkdir()
    expect_error(tmp_path / "folder.gguf", "not a regular file")


@pytest.mark.parametrize("orig", ["32,4", 7, [-1, 4], [2 ** 31 - 1, 2 ** 31 - 1]])
def test_recorded_original_shape_of_the_wrong_kind(tmp_path, orig):
    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), arch="qwen_image")
    if isinstance(orig, str):
        w.add_string("comfy.gguf.orig_shape.a", orig)
    elif isinstance(orig, int):
        w.add_uint32("comfy.gguf.orig_shape.a", orig)
    else:
        w.add_array("comfy.gguf.orig_shape.a", orig)
    w.add_tensor("a", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError) as info:
        load_state_dict(GGUFFile(path))
    assert "m.gguf" in str(info.value) and "original shape" in str(info.value)


def test_recorded_original_shape_of_a_tensor_of_no_elements_beyond_any_tensor(tmp_path):
    # [0, 2**64 - 1] holds the tensor's 0 elements, but torch cannot make the shape (found by fuzzing).
    orig = kv("comfy.gguf.orig_shape.m", 9, struct.pack("<IQ2Q", 10, 2, 0, 2 ** 64 - 1))
    path = write(tmp_path, raw_gguf([("m", [0], T.F32, 0)], b"", kv=orig, n_kv=1))
    with pytest.raises(GGUFError) as info:
        load_state_dict(GGUFFile(path))
    assert "model.gguf" in str(info.value) and "original shape" in str(info.value)


def test_five_dimensional_tensor_says_what_it_is_and_what_to_do(tmp_path):
    """Some converters write a VAE's 3-D convolution kernels with 5 dimensions, which GGUF does not allow."""
    content = raw_gguf([("decoder.conv1.weight", [3, 3, 3, 16, 64], T.F32, 0)], bytes(3 * 3 * 3 * 16 * 64 * 4))
    message = expect_error(write(tmp_path, content), "5 dimensions", "[64, 16, 3, 3, 3]", "at most 4",
                           "qwen_image_vae.safetensors", "comfy.gguf.orig_shape.decoder.conv1.weight")
    assert "corrupt" not in message


def test_tensor_count_one_short_is_refused(tmp_path):
    """With the count one short, every tensor would be read from the wrong place and load as garbage."""
    content = raw_gguf([("a", [32], T.F32, 0), ("b", [32], T.F32, 128)], bytes(256))
    content = content[:8] + struct.pack("<Q", 1) + content[16:]
    expect_error(write(tmp_path, content), "past the end of its last listed tensor", "1 listed")


# --- what real tools write, and what a damaged or unfinished file holds ------------------------------

def test_scalar_of_no_dimensions_reads_as_one_element_as_gguf_py_writes_it(tmp_path):
    path = tmp_path / "scalar.gguf"
    w = GGUFWriter(str(path), arch="qwen_image")
    w.add_tensor("s", np.array(2.5, dtype=np.float32))
    w.add_tensor("v", np.arange(4, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert GGUFReader(str(path)).tensors[0].n_elements == 1 and list(GGUFReader(str(path)).tensors[0].shape) == []
    sd = load_state_dict(GGUFFile(path))
    assert sd["s"].shape == () and sd["s"].item() == 2.5
    expect_error(write(tmp_path, raw_gguf([("q", [], T.Q8_0, 0)], bytes(64))), "row length 1", "block size 32")


def test_lengths_beyond_any_real_file_are_refused_before_being_read(tmp_path, monkeypatch):
    huge_key = struct.pack("<Q", 1 << 20) + b"k" * 8
    expect_error(write(tmp_path, raw_gguf([], b"", kv=huge_key, n_kv=1)), "metadata key of 1,048,576 bytes")
    long_name = "t" * 5000
    expect_error(write(tmp_path, raw_gguf([(long_name, [8], T.F32, 0)], bytes(32))), "tensor name of 5,000 bytes")
    big_string = kv("general.name", 8, struct.pack("<Q", 1 << 30))
    expect_error(write(tmp_path, raw_gguf([], b"", kv=big_string, n_kv=1)), "string of 1,073,741,824 bytes")
    # A count the file could hold (it is 300 MB, sparse) but no tokenizer comes near.
    path = write(tmp_path, raw_gguf([], b"", kv=kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 1 << 25)),
                                    n_kv=1))
    with open(path, "r+b") as f:
        f.truncate(300 << 20)
    expect_error(path, "metadata array of 33,554,432 strings or arrays")
    # Whatever else makes reading the header run out of memory is a damaged header too.
    monkeypatch.setattr("loaders.gguf.reader._Cursor.string", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    expect_error(write(tmp_path, raw_gguf([("a", [8], T.F32, 0)], bytes(32))), "more metadata than memory holds")


def _sparse_gguf(path, n_values: int, tail: bytes = b"", name: str = "w"):
    """A GGUF of one F32 tensor of ``n_values`` as a sparse file: zeros (no disk used) but for the
    header and ``tail``, its last bytes."""
    head = raw_gguf([(name, [n_values], T.F32, 0)], b"")
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + 4 * n_values - len(tail))
        f.seek(0, 2)
        f.write(tail)
    return path


def test_download_ending_in_reserved_zeros_is_refused(tmp_path):
    """aria2c reserves a file's whole size before downloading: stopped early, the file has its full size
    and ends in zeros, so the size check alone passes it."""
    n = (64 << 20) // 4
    assert GGUFFile(_sparse_gguf(tmp_path / "model.gguf", n, struct.pack("<f", 1.0) + bytes(60 << 10))).tensors
    message = expect_error(_sparse_gguf(tmp_path / "model.gguf", n), "incomplete download", "last 64 KiB",
                           "all zeros", "aria2c")
    assert "control file" not in message
    (tmp_path / "model.gguf.aria2").write_bytes(b"\0")
    expect_error(tmp_path / "model.gguf", "aria2c's control file lies beside it")
    # A small file is not judged by its zeros: a placeholder tensor may well be all zeros. Nor is a
    # language model's token table or output head, whose padding rows past the tokenizer may be.
    GGUFFile(_sparse_gguf(tmp_path / "small.gguf", (1 << 20) // 4))
    for table in ("token_embd.weight", "output.weight"):
        GGUFFile(_sparse_gguf(tmp_path / "table.gguf", n, name=table))


def test_part_of_a_split_model_says_to_merge(tmp_path):
    entries = kv("split.no", 2, struct.pack("<H", 1)) + kv("split.count", 2, struct.pack("<H", 3))
    expect_error(write(tmp_path, raw_gguf([("a", [8], T.F32, 0)], bytes(32), kv=entries, n_kv=2)),
                 "part 2 of a model split into 3 files", "llama-gguf-split --merge")


def _meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's overcommit accounting")
def test_file_larger_than_memory_opens(tmp_path, caplog):
    """A private writable map of a file larger than RAM + swap is refused under Linux's default
    overcommit unless it reserves nothing: a BF16 Qwen-Image (41 GB) on a 32 GB machine."""
    with open("/proc/sys/vm/overcommit_memory") as f:
        if f.read().strip() != "0":
            pytest.skip("the test needs Linux's default overcommit heuristic")
    n = (_meminfo_bytes("MemTotal") + _meminfo_bytes("SwapTotal") + (2 << 30)) // 4
    path = _sparse_gguf(tmp_path / "big.gguf", n, struct.pack("<f", 1.5))
    with caplog.at_level(logging.INFO):
        w = GGUFFile(path).raw("w")
    assert w.numel() == 4 * n and w[-4:].view(torch.float32).item() == 1.5
    assert "read-only" not in caplog.text  # mapped copy-on-write, as any file is


def test_map_refused_private_is_read_only_and_reads_the_same(tmp_path, monkeypatch, recwarn, caplog):
    data = np.arange(64, dtype=np.float32).tobytes()
    path = write(tmp_path, raw_gguf([("w", [64], T.F32, 0)], data))
    real = mmap.mmap

    def refuse_private(fileno, length, **kwargs):
        if "flags" in kwargs or kwargs.get("access") == mmap.ACCESS_COPY:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return real(fileno, length, **kwargs)
    monkeypatch.setattr(mmap, "mmap", refuse_private)
    with caplog.at_level(logging.INFO):
        sd = load_state_dict(GGUFFile(path))
    assert torch.equal(sd["w"], torch.arange(64, dtype=torch.float32))
    assert "model.gguf: mapped read-only" in caplog.text
    assert not [w for w in recwarn.list if "not writable" in str(w.message)]
