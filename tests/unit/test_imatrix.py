"""Importance matrices: collecting, the file format (llama.cpp's GGUF imatrix), converting with one
(llama.cpp's bytes for its weighted searches) and whether they lower the error they are meant to."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, GGUFReader, GGUFValueType, GGUFWriter, quants

from comfy_env import REPO
from llama_cpp_ref import quantize_ref
from tiny_models import tiny_qwen
from loaders.convert.imatrix import ImportanceCollector, read_importance
from loaders.convert.to_gguf import convert
from loaders.gguf.errors import GGUFError
from loaders.quant.formats import FORMATS


def llama_cpp_imatrix(path, entries: dict[str, tuple[np.ndarray, float]], kind: str = "imatrix") -> None:
    """An imatrix file laid out as llama.cpp's llama-imatrix writes it (sums of squares, counts)."""
    writer = GGUFWriter(str(path), arch="unused")
    writer.kv_data[0].pop("general.architecture")
    writer.add_type(kind)
    writer.add_array("imatrix.datasets", ["calibration.txt"])
    writer.add_uint32("imatrix.chunk_count", 10)
    writer.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, count) in entries.items():
        writer.add_tensor(f"{name}.in_sum2", sums.astype(np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[count]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_collected_sums_are_saved_and_read_back_as_mean_squares(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 7, 16)).astype(np.float32), rng.standard_normal((5, 16)).astype(np.float32)
    c = rng.standard_normal((3, 24)).astype(np.float32)
    collector = ImportanceCollector()
    collector.add("blocks.0.w.weight", torch.from_numpy(a))
    collector.add("blocks.0.w.weight", torch.from_numpy(b))
    collector.add("blocks.1.w.weight", torch.from_numpy(c))
    collector.calls = 2
    path = tmp_path / "m.imatrix.gguf"
    assert len(collector.save(path, "prompts.txt").sums) == 2
    got = read_importance(path)
    rows = np.concatenate([a.reshape(-1, 16), b])
    np.testing.assert_allclose(got["blocks.0.w.weight"], (rows.astype(np.float64) ** 2).mean(0), rtol=1e-5)
    np.testing.assert_allclose(got["blocks.1.w.weight"], (c.astype(np.float64) ** 2).mean(0), rtol=1e-5)
    reader = GGUFReader(str(path))
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.datasets").contents() == ["prompts.txt"]
    assert "general.architecture" not in reader.fields
    assert not list(tmp_path.glob("*.part"))


def test_a_collector_refuses_inputs_of_another_width_and_an_empty_save(tmp_path):
    collector = ImportanceCollector()
    with pytest.raises(GGUFError, match="no activations"):
        collector.save(tmp_path / "e.gguf", "none")
    collector.add("w", torch.ones(2, 8))
    with pytest.raises(ValueError, match="4 channels after 8"):
        collector.add("w", torch.ones(2, 4))


def test_saving_adds_to_the_file_once_per_collector_unless_replacing(tmp_path):
    rng = np.random.default_rng(4)
    a, b, c = (rng.standard_normal((n, 8)).astype(np.float32) for n in (3, 5, 7))
    path = tmp_path / "m.imatrix.gguf"
    first = ImportanceCollector()
    first.add("w", torch.from_numpy(a))
    first.calls = 1
    first.save(path, "one")
    first.add("w", torch.from_numpy(b))  # more prompts through the same collector: saved again, not twice
    first.calls = 2
    first.save(path, "one")
    second = ImportanceCollector()  # a new collector (a restart, a collector ComfyUI let go of)
    second.add("w", torch.from_numpy(c))
    second.add("v", torch.from_numpy(a[:, :4]))
    second.calls = 1
    saved = second.save(path, "two")
    assert saved.calls == 3 and saved.datasets == ["one", "two"]
    rows = np.concatenate([a, b, c]).astype(np.float64)
    np.testing.assert_allclose(read_importance(path)["w"], (rows ** 2).mean(0), rtol=1e-5)
    np.testing.assert_allclose(read_importance(path)["v"], (a[:, :4].astype(np.float64) ** 2).mean(0), rtol=1e-5)
    fresh = ImportanceCollector()
    fresh.add("w", torch.from_numpy(c))
    assert fresh.save(path, "three", replace=True).calls == 0
    assert list(read_importance(path)) == ["w"]
    np.testing.assert_allclose(read_importance(path)["w"], (c.astype(np.float64) ** 2).mean(0), rtol=1e-5)
    other = ImportanceCollector()
    other.add("w", torch.ones(2, 16))
    with pytest.raises(GGUFError, match="m.imatrix.gguf: holds w with 8 channels where this model's has 16"):
        other.save(path, "four")


def test_llama_cpps_imatrix_layout_is_read_and_others_are_refused(tmp_path):
    sums = np.arange(1, 9, dtype=np.float32)
    path = tmp_path / "llama.gguf"
    llama_cpp_imatrix(path, {"blk.0.attn_q.weight": (sums, 4.0), "blk.0.attn_k.weight": (sums, 0.0)})
    got = read_importance(path)
    assert list(got) == ["blk.0.attn_q.weight"]  # a weight never reached (count 0) is left out
    np.testing.assert_array_equal(got["blk.0.attn_q.weight"], sums / 4)
    model = tmp_path / "model.gguf"
    llama_cpp_imatrix(model, {"x": (sums, 1.0)}, kind="model")
    with pytest.raises(GGUFError, match="model.gguf: is a GGUF file but not an importance matrix"):
        read_importance(model)
    legacy = tmp_path / "imatrix.dat"
    legacy.write_bytes(b"\x01\x00\x00\x00" + b"\x00" * 40)
    with pytest.raises(GGUFError, match="imatrix.dat: is not a GGUF imatrix"):
        read_importance(legacy)
    negative = tmp_path / "negative.gguf"
    llama_cpp_imatrix(negative, {"blk.0.attn_q.weight": (-sums, 4.0)})
    with pytest.raises(GGUFError, match="negative.gguf: blk.0.attn_q.weight holds negative or non-finite"):
        read_importance(negative)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError, match="empty.gguf: is empty"):
        read_importance(empty)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(GGUFError, match="cut.gguf: is damaged"):
        read_importance(truncated)


def tiny_importance(values: dict, rng) -> dict[str, np.ndarray]:
    """Mean squares of made-up activations for the 2-D weights of ``values``, channels of very
    different scale, as a transformer's are."""
    return {name: (rng.lognormal(0, 1.5, v.shape[-1]) ** 2).astype(np.float32)
            for name, v in values.items() if v.ndim == 2}


def test_a_model_converted_with_an_importance_matrix_has_llama_cpps_weighted_bytes(tmp_path, lib):
    src, values = tiny_qwen(tmp_path, "fp32")
    importance = tiny_importance(values, np.random.default_rng(1))
    skipped = next(n for n in importance if n.startswith("transformer_blocks.1.") and "img_mlp" in n)
    imatrix = tmp_path / "q.imatrix.gguf"
    llama_cpp_imatrix(imatrix, {n: (v * 3, 3.0) for n, v in importance.items() if n != skipped})
    from loaders.convert.checkpoint import open_checkpoint
    out = convert(open_checkpoint(str(src)), tmp_path / "w.gguf", "Q4_K_M", imatrix=imatrix)
    plain = convert(open_checkpoint(str(src)), tmp_path / "p.gguf", "Q4_K_M")
    stored = {t.name: t for t in GGUFReader(out.path).tensors}
    weighted = 0
    for name, qtype in out.types.items():
        if qtype not in FORMATS or qtype == T.Q8_0:
            continue
        rows = values[name].numpy().astype(np.float32).reshape(-1, values[name].shape[-1])
        use = importance.get(name) if name != skipped else None
        want = quantize_ref(lib, qtype.name.lower().replace("_k", "_K"), rows,
                            None if use is None else use * np.float32(3) / np.float32(3))
        assert np.array_equal(np.asarray(stored[name].data).reshape(want.shape), want), name
        weighted += use is not None
    assert weighted >= 10 and out.types == plain.types
    # What llama-quantize records of the matrix it used, with the same keys and types.
    fields = GGUFReader(out.path).fields
    assert fields["quantize.imatrix.file"].contents() == "q.imatrix.gguf"
    assert fields["quantize.imatrix.dataset"].contents() == "calibration.txt"
    assert fields["quantize.imatrix.entries_count"].contents() == len(importance) - 1
    assert fields["quantize.imatrix.chunks_count"].contents() == 10
    assert fields["quantize.imatrix.chunks_count"].types == [GGUFValueType.UINT32]
    assert not any(k.startswith("quantize.") for k in GGUFReader(plain.path).fields)
    # The same types: the same tensor bytes, only better chosen codes (the header grows by the record).
    assert sum(int(t.n_bytes) for t in stored.values()) == sum(int(t.n_bytes) for t in GGUFReader(plain.path).tensors)


def test_an_importance_matrix_of_another_model_is_refused(tmp_path):
    src, values = tiny_qwen(tmp_path, "fp32")
    from loaders.convert.checkpoint import open_checkpoint
    other = tmp_path / "other.gguf"
    llama_cpp_imatrix(other, {"blk.0.attn_q.weight": (np.ones(64, np.float32), 1.0)})
    with pytest.raises(GGUFError, match="other.gguf: has none of the .* weights to quantize"):
        convert(open_checkpoint(str(src)), tmp_path / "o.gguf", "Q4_K_M", imatrix=other)
    name = next(n for n, v in values.items() if n.startswith("transformer_blocks.0.") and v.ndim == 2)
    narrow = tmp_path / "narrow.gguf"
    llama_cpp_imatrix(narrow, {name: (np.ones(values[name].shape[-1] + 8, np.float32), 1.0)})
    with pytest.raises(GGUFError, match=f"narrow.gguf: its entry for {name} has"):
        convert(open_checkpoint(str(src)), tmp_path / "n.gguf", "Q4_K_M", imatrix=narrow)
    assert not list(tmp_path.glob("*.gguf.part")) and not (tmp_path / "n.gguf").exists()


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL,
                                   T.IQ4_XS])
def test_an_importance_matrix_lowers_the_error_of_the_layers_output(qtype):
    # What the matrix is for: the error of W x on the activations it was collected from, not of W.
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 1024)).astype(np.float32)
    x = (rng.standard_normal((512, 1024)) * rng.lognormal(0, 1.5, 1024)).astype(np.float32)
    importance = (x.astype(np.float64) ** 2).mean(0).astype(np.float32)

    def output_error(data):
        wq = quants.dequantize(data, qtype).reshape(w.shape)
        return float(np.linalg.norm(x @ (wq - w).T))

    plain, weighted = output_error(FORMATS[qtype].encode(w)), output_error(FORMATS[qtype].encode(w, importance))
    assert weighted < 0.9 * plain, (plain, weighted)


def test_the_command_line_takes_an_importance_matrix(tmp_path):
    src, values = tiny_qwen(tmp_path, "bf16")
    imatrix = tmp_path / "m.gguf"
    llama_cpp_imatrix(imatrix, {n: (v, 1.0) for n, v in tiny_importance(values, np.random.default_rng(3)).items()})
    out = tmp_path / "cli.gguf"
    r = subprocess.run([sys.executable, "-m", "loaders.convert", str(src), str(out), "--type", "Q4_K_S",
                        "--imatrix", str(imatrix)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and out.exists(), r.stderr[-2000:]
    assert "m.gguf: importance for" in r.stderr
    bad = subprocess.run([sys.executable, "-m", "loaders.convert", str(src), str(tmp_path / "x.gguf"),
                          "--imatrix", str(src)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "is not a GGUF imatrix" in bad.stderr and "Traceback" not in bad.stderr
