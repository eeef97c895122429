"""Data-parallel training over processes (`multimodal.training.parallel`): two gloo processes on loopback, each
with its share of every batch, take the steps one process takes on the whole batch, agree on when to stop, and
resume like one."""

import random

import pytest
import torch
import torch.distributed as dist

from multimodal.training.loop import Run, Schedule, train
from multimodal.training.parallel import average_gradients, launch, my_share, world

STEPS, BATCH, FEATURES = 6, 8, 5
TRUE_WEIGHTS = torch.tensor([[0.5, -1.0, 2.0, 0.25, -0.75]])


def _rows(rng: random.Random, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor([[rng.gauss(0, 1) for _ in range(FEATURES)] for _ in range(count)])  # [count, F]
    return x, x @ TRUE_WEIGHTS.T + 0.1 * torch.tensor([[rng.gauss(0, 1)] for _ in range(count)])


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)


def _toy_training(out_dir: str, fail_at: int | None = None) -> dict:
    """One process of a toy regression trained by `train` on its share of each batch; returns the weights and the
    largest difference between any two processes' weights."""
    model, optimizer = _model_and_optimizer()

    def step_loss(step: int) -> torch.Tensor:
        if step == fail_at and world()[0] == 1:
            raise RuntimeError("killed mid-way")
        x, y = _rows(random.Random(f"toy-{step}"), BATCH)  # every process draws the whole batch
        x, y = my_share(x), my_share(y)
        return torch.nn.functional.mse_loss(model(x), y)

    train(Run(out_dir, "toy", {}), model, optimizer, Schedule(STEPS, 0.05, warmup=1), step_loss, save_every=3,
          log_every=2)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world()[1])]
    dist.all_gather(gathered, flat)
    return {"weights": flat, "spread": max((g - flat).abs().max().item() for g in gathered)}


def _one_process_on_the_union() -> torch.Tensor:
    """The same steps in one process on the whole batches."""
    model, optimizer = _model_and_optimizer()
    schedule = Schedule(STEPS, 0.05, warmup=1)
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        x, y = _rows(random.Random(f"toy-{step}"), BATCH)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        optimizer.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_two_processes_take_the_steps_of_one_process_on_the_whole_batch(tmp_path):
    result = launch(_toy_training, 2, 1, str(tmp_path / "run"))
    assert result["spread"] == 0.0  # every process holds the same weights
    torch.testing.assert_close(result["weights"], _one_process_on_the_union(), rtol=1e-5, atol=1e-6)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "in each of 2 processes" in log and log.count("step 2/6 loss") == 1  # the first process logs, once


def test_a_run_killed_in_one_process_stops_all_and_resumes_to_the_uninterrupted_weights(tmp_path):
    with pytest.raises(RuntimeError, match="process 1 failed: RuntimeError: killed mid-way"):
        launch(_toy_training, 2, 1, str(tmp_path / "run"), 4)
    assert "step': 3" in str(torch.load(tmp_path / "run" / "trainer.pt", weights_only=True)).replace('"', "'")
    resumed = launch(_toy_training, 2, 1, str(tmp_path / "run"))
    torch.testing.assert_close(resumed["weights"], _one_process_on_the_union(), rtol=1e-5, atol=1e-6)


def _average(stop_rank: int) -> dict:
    rank, _ = world()
    both = torch.nn.Parameter(torch.zeros(3))
    one = torch.nn.Parameter(torch.zeros(2))
    neither = torch.nn.Parameter(torch.zeros(1))
    both.grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)
    if rank == 0:
        one.grad = torch.tensor([4.0, -6.0])
    stop = average_gradients([both, one, neither], stop=rank == stop_rank)
    return {"both": both.grad, "one": one.grad, "neither": neither.grad, "stop": stop}


def test_gradients_average_over_processes_missing_ones_count_as_zero_and_any_stop_stops_all():
    result = launch(_average, 2, 1, 1)
    torch.testing.assert_close(result["both"], torch.tensor([1.5, 3.0, 4.5]))
    torch.testing.assert_close(result["one"], torch.tensor([2.0, -3.0]))
    assert result["neither"] is None and result["stop"] is True
    assert launch(_average, 2, 1, -1)["stop"] is False


def _shares(rows: list) -> list:
    share = my_share(rows)
    gathered = [None, None]
    dist.all_gather_object(gathered, share)
    return gathered


def test_processes_share_out_the_rows_of_one_batch_and_one_process_keeps_them_all():
    assert launch(_shares, 2, 1, list(range(8))) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert my_share(list(range(8))) == list(range(8))
    with pytest.raises(RuntimeError, match="A batch of 7 does not split evenly over 2 processes"):
        launch(_shares, 2, 1, list(range(7)))


def test_training_processes_are_refused_for_the_judge(capsys):
    from multimodal.cli import main

    assert main(["train", "judge", "--processes", "2", "--out", "unused"]) != 0
    assert "the judge's contrastive loss needs its whole batch in one process" in capsys.readouterr().err
