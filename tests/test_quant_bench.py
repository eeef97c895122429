"""`multimodal bench quant` runs end to end on a tiny model and counts bytes correctly."""

import torch
from torch import nn

from multimodal.benchmarks.quant import weight_bytes
from multimodal.cli import main
from multimodal.quantize import QuantSpec, quantize_model


def test_weight_bytes_counts_one_embedding_row_per_token():
    model = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 32), nn.Linear(32, 64, bias=False))
    stored, read = weight_bytes(model)
    linear_bytes = 4 * (8 * 32 + 32 + 32 * 64)
    assert stored == 4 * 100 * 8 + linear_bytes
    assert read == 4 * 8 + linear_bytes
    quantized = quantize_model(model, QuantSpec("int4", 32, exclude=("1",)))
    # int4: half a byte per weight plus a bfloat16 scale and zero per group of 32.
    assert weight_bytes(quantized)[1] == 4 * 8 + 4 * (8 * 32 + 32) + 32 * 64 // 2 + (32 // 32) * 64 * 2 * 2
    assert torch.is_tensor(quantized[2].weight)


def test_bench_quant_prints_a_row_per_variant(capsys):
    assert main(["bench", "quant", "--preset", "tiny-glm4", "--group-size", "32", "--dtype", "float32",
                 "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1", "--bandwidth-mb", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("measured read bandwidth:")
    # INT4 takes the C step where the kernels are the AVX2 build (glm/cpu_decode.py), else the eager path
    assert any(line.startswith("decode step in one C call: float, int8") for line in lines)
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("-----")) + 1:]
    rows = {line.split("|")[0].strip(): [cell.strip() for cell in line.split("|")[1:]] for line in table}
    assert list(rows) == ["float", "int8", "int4 g32"]
    read_share = {name: float(cells[2].rstrip("%")) for name, cells in rows.items()}  # read/token vs float
    assert read_share["int4 g32"] < read_share["int8"] < read_share["float"] == 100.0
    assert float(rows["float"][9]) == 0.0 and float(rows["int8"][9]) > 0.0  # logits error
    assert rows["float"][4] == rows["float"][6] == "1.00x"  # prefill and decode against float
    for cells in rows.values():  # tokens/s, GB/s and % of floor (arithmetic: test_floor_columns_are_bytes_times_steps)
        assert float(cells[3]) > 0 and float(cells[5]) > 0
        assert float(cells[7]) >= 0 and float(cells[8].rstrip("%")) >= 0


def test_floor_columns_are_bytes_times_steps_against_the_measured_bandwidth():
    from multimodal.benchmarks._bandwidth import floor_columns, read_bandwidth

    assert floor_columns(read_bytes=1_500_000_000, tokens_per_second=2.0, bandwidth=12e9) == (3.0, 25.0)
    assert 1e8 < read_bandwidth("cpu", 32 << 20, repeats=2) < 1e13  # bytes/s of a real read, within physics


def test_bench_gpu_runs_its_table_on_the_cpu_at_a_tiny_size(capsys):
    """The GPU command is prepared and tested here; on a lent GPU it runs with its defaults (GLM-4-9B shapes)."""
    assert main(["bench", "gpu", "--preset", "tiny", "--device", "cpu", "--batch-sizes", "1", "2",
                 "--prompt-len", "4", "--new-tokens", "3", "--group-size", "32", "--bandwidth-mb", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("stack"))) + 1:]
    names = [" ".join(row.split()[:2]) for row in table]
    assert names == ["ours bf16"] * 2 + ["transformers eager"] * 2 + ["ours int8"] * 2 + ["ours int4"] * 2
    for row in table:
        cells = row.split()
        assert not float(cells[-5]) <= 0 and cells[-4].endswith("x") and cells[-1].endswith("%")  # NaN: noise
