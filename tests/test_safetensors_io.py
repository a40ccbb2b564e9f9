"""The streaming writer and reader against the reference `safetensors` library."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from upcycle.errors import UpcycleError
from upcycle.io.safetensors_io import PlannedTensor, SafetensorsReader, ShardedWriter, assign_shards


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
    reader = SafetensorsReader([path])
    for k, v in ts.items():
        assert torch.equal(reader.get(k), v)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-3])
    with pytest.raises(UpcycleError, match="cut.safetensors: truncated"):
        SafetensorsReader([tmp_path / "cut.safetensors"])
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(UpcycleError, match="tiny.safetensors: truncated"):
        SafetensorsReader([tmp_path / "tiny.safetensors"])
