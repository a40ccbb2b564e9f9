"""The streaming writer and reader against the reference `safetensors` library."""

import json
import math
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from upcycle.errors import UpcycleError
from upcycle.io.safetensors_io import DTYPES, PlannedTensor, SafetensorsReader, ShardedWriter, assign_shards


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 4, generator=g),
        "b": torch.randn(5, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 7),
        "stack": torch.randn(4, 2, 3, generator=g),
        "ints": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


def test_writer_output_reads_back_with_safetensors(tmp_path):
    ts = tensors()
    plan = [PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in ts.items()]
    w = ShardedWriter(tmp_path, plan, max_shard_bytes=10**9)
    for k, v in ts.items():
        if k == "stack":  # written in parts along dim 0, as expert banks are
            for part in v:
                w.write(k, part)
        else:
            w.write(k, v)
    assert w.close() == ["model.safetensors"]
    back = load_file(tmp_path / "model.safetensors")
    assert back.keys() == ts.keys()
    for k in ts:
        assert back[k].dtype == ts[k].dtype and torch.equal(back[k], ts[k])


def test_sharding_and_casting(tmp_path):
    ts = {f"t{i}": torch.full((10, 10), float(i)) for i in range(5)}
    plan = [PlannedTensor(k, (10, 10), torch.float16) for k in ts]
    w = ShardedWriter(tmp_path, plan, max_shard_bytes=450)  # 200 bytes each in fp16 -> 2 per shard
    for k, v in ts.items():
        w.write(k, v)
    files = w.close()
    assert len(files) == 3 and (tmp_path / "model.safetensors.index.json").is_file()
    reader = SafetensorsReader(tmp_path / f for f in files)
    for k, v in ts.items():
        assert reader.get(k).dtype == torch.float16 and torch.equal(reader.get(k).float(), v)


def test_writer_checks_order_and_completeness(tmp_path):
    plan = [PlannedTensor("x", (2,), torch.float32), PlannedTensor("y", (2,), torch.float32)]
    w = ShardedWriter(tmp_path, plan, 10**6)
    with pytest.raises(ValueError, match="expected tensor 'x'"):
        w.write("y", torch.zeros(2))
    w.write("x", torch.zeros(2))
    with pytest.raises(ValueError, match="'y' and later ones were never written"):
        w.close()


def test_assign_shards_keeps_order_and_limit():
    plan = [PlannedTensor(str(i), (n,), torch.uint8) for i, n in enumerate([4, 4, 9, 1, 1])]
    shards = assign_shards(plan, 8)
    assert [[t.name for t in s] for s in shards] == [["0", "1"], ["2"], ["3", "4"]]


def test_reader_matches_reference_and_rejects_damage(tmp_path):
    ts = {k: v for k, v in tensors().items()}
    path = tmp_path / "ref.safetensors"
    save_file(ts, path)
    reader = SafetensorsReader([path], dtypes=frozenset(DTYPES))  # "ints" is not a weight dtype
    for k, v in ts.items():
        assert torch.equal(reader.get(k), v)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-3])
    with pytest.raises(UpcycleError, match="cut.safetensors: truncated"):
        SafetensorsReader([tmp_path / "cut.safetensors"], dtypes=frozenset(DTYPES))
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(UpcycleError, match="tiny.safetensors: truncated"):
        SafetensorsReader([tmp_path / "tiny.safetensors"])


# ------------------------------------------------------------------ bad input: damaged headers, quantized weights


def raw_safetensors(path, header, data: bytes = b""):
    """A safetensors file written byte by byte, so its header can say anything."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def good_entry(begin=0, shape=(2, 2)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + 4 * math.prod(shape)]}


DAMAGED = {  # name: (header, data, words the one-line error must contain)
    "negative shape": ({"w": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, bytes(16),
                       ["'w'", "shape [-2, -2]", "non-negative"]),
    "fractional shape": ({"w": {"dtype": "F32", "shape": [2.5, 2], "data_offsets": [0, 16]}}, bytes(16), ["'w'", "shape"]),
    "deeply nested JSON": (b'{"w": ' + b"[" * 10000 + b"]" * 10000 + b"}", b"", ["nested too deeply"]),
    "bytes do not match the shape": ({"w": good_entry(shape=(2, 3))} | {"w": {"dtype": "F32", "shape": [2, 3],
                                      "data_offsets": [0, 16]}}, bytes(16), ["'w'", "16 bytes for shape [2, 3]"]),
    "overlapping tensors": ({"a": good_entry(0), "b": good_entry(8)}, bytes(24), ["'b' starts at byte 8 but tensor 'a' ends at byte 16", "overlap"]),
    "a gap between tensors": ({"a": good_entry(0), "b": good_entry(20)}, bytes(36), ["'b' starts at byte 20 but tensor 'a' ends at byte 16", "gap"]),
    "reversed offsets": ({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}, bytes(8), ["'w'", "data_offsets"]),
    "trailing bytes": ({"w": good_entry(0)}, bytes(20), ["4 bytes after the last tensor"]),
    "unknown dtype": ({"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), ["'w'", "unknown dtype 'F33'"]),
    "entry not a mapping": ({"w": [1, 2]}, b"", ["'w'", "needs dtype, shape and data_offsets"]),
    "header not a mapping": ([1, 2], b"", ["list"]),
    "metadata not strings": ({"__metadata__": {"format": 1}, "w": good_entry(0)}, bytes(16), ["__metadata__"]),
}


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_damaged_headers_are_refused_in_one_line_naming_file_and_tensor(tmp_path, damage):
    header, data, words = DAMAGED[damage]
    path = raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(UpcycleError) as err:
        SafetensorsReader([path])
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    for w in words:
        assert w in message, message
    # The reference library refuses the same file: the check is not stricter than the format.
    with pytest.raises(Exception):
        load_file(path)


def test_a_well_formed_raw_file_is_accepted(tmp_path):
    """The control for the table above: the same writer with a consistent header reads back."""
    values = torch.arange(8, dtype=torch.float32)
    path = raw_safetensors(tmp_path / "ok.safetensors", {"a": good_entry(0), "z": {"dtype": "F32", "shape": [0, 3],
                           "data_offsets": [16, 16]}, "b": good_entry(16)}, values.numpy().tobytes())
    reader = SafetensorsReader([path])
    assert reader.names() == ["a", "z", "b"]  # header order, not offset order
    assert reader.get("b").tolist() == [[4.0, 5.0], [6.0, 7.0]] and reader.get("z").shape == (0, 3)
    assert torch.equal(load_file(path)["a"], reader.get("a"))


QUANTIZED = {"I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@pytest.mark.parametrize("code", list(QUANTIZED))
def test_integer_and_float8_weights_are_refused_naming_file_tensor_and_dtype(tmp_path, code):
    path = tmp_path / "model.safetensors"
    save_file({"model.norm.weight": torch.ones(4),
               "model.layers.0.mlp.up_proj.weight": torch.ones(4, 4).to(QUANTIZED[code])}, path)
    with pytest.raises(UpcycleError) as err:
        SafetensorsReader([path])
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: tensor 'model.layers.0.mlp.up_proj.weight' is stored as {code}")
    assert "dequantize" in message
    if code in DTYPES:  # reading integer tensors on purpose (not as weights) stays possible
        reader = SafetensorsReader([path], dtypes=frozenset(DTYPES))
        assert reader.get("model.layers.0.mlp.up_proj.weight").dtype == QUANTIZED[code]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_floating_weights_are_read(tmp_path, dtype):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.tensor([1.5, -2.0]).to(dtype)}, path)
    assert SafetensorsReader([path]).get("w").dtype == dtype
