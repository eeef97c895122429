"""`multimodal bench train` runs both loops on each model and prints one row per loop with its speed ratio and the
loss difference to the reference (tiny budgets; the README's numbers come from the full command)."""

from __future__ import annotations

import pytest

from multimodal.cli import main


@pytest.mark.parametrize("model", ["diffusion", "vlm", "judge"])
def test_bench_train_prints_the_reference_and_each_fast_batch(model, capsys):
    assert main(["bench", "train", model, "--samples", "4", "--batch-sizes", "2,4", "--scenes", "8",
                 "--eval-batches", "1", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("loop"))) + 1:]
    assert [row.split()[0] for row in table] == ["reference", "fast", "fast"]
    assert table[0].split()[-3] == "1.00x" and float(table[0].split()[-1]) == 0
    reference_rate = float(table[0].split()[-4])
    for row in table:  # columns from the right: loss vs reference, validation loss, speed ratio, samples/s
        cells = row.split()
        rate = float(cells[-4])
        assert 0 < float(cells[-2]) < float("inf") and rate > 0
        # The ratio is printed from the unrounded rates; the rates are printed to 0.1, which at these tiny budgets
        # (a few samples/s) moves a ratio recomputed from them by up to ratio * (0.05 / rate + 0.05 / reference).
        ratio = rate / reference_rate
        rounding = ratio * (0.05 / rate + 0.05 / reference_rate) + 0.005
        assert float(cells[-3].rstrip("x")) == pytest.approx(ratio, abs=rounding)
    assert [row.split()[-6] for row in table[1:]] == ["2", "4"]  # the batch column
