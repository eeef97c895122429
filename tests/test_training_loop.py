"""Training machinery: train-split-only batches, exact resume, the schedule, and the world tokenizer."""

from __future__ import annotations

import random

import pytest
import torch

from multimodal.assets import load_world_tokenizer
from multimodal.language import scene_tasks
from multimodal.training.loop import Run, Runtime, Schedule, TrainScenes, train
from multimodal.training.tokenizer import GLM_SPECIAL_TOKENS
from multimodal.world import SPLITS, make_scene, split_seeds


def test_batches_hold_only_train_seeds():
    pool = TrainScenes(50, 32)
    seeds = pool.batch_seeds(random.Random(3), 64)
    assert all(seed in SPLITS["train"] for seed in seeds)
    images = pool.images(seeds[:4])
    assert images.shape == (4, 3, 32, 32) and -1 <= images.min() and images.max() <= 1
    pool.seeds = split_seeds("test", 5)  # a pool that was pointed at the test split must refuse to hand it out
    with pytest.raises(AssertionError, match="not a train seed"):
        pool.batch_seeds(random.Random(3), 8)


def test_mixed_scenes_draw_each_world_at_its_share_and_keep_them_apart():
    from multimodal.training.loop import MixedScenes
    from multimodal.world import DRAWING

    pool = MixedScenes([TrainScenes(30, 32), TrainScenes(30, 32, DRAWING)], [0.75, 0.25])
    keys = pool.batch_seeds(random.Random(5), 800)
    assert 0.2 < sum(world == 1 for world, _ in keys) / len(keys) < 0.3
    assert all(seed in SPLITS["train"] for _, seed in keys)
    default, drawing = next(k for k in keys if k[0] == 0), next(k for k in keys if k[0] == 1)
    assert pool.scene(default) == make_scene(default[1]) and pool.scene(drawing) == make_scene(drawing[1], DRAWING)
    torch.testing.assert_close(pool.images([drawing]), TrainScenes(30, 32, DRAWING).images([drawing[1]]))
    with pytest.raises(ValueError, match="summing to 1"):
        MixedScenes([TrainScenes(3, 32)], [0.5])


class Interrupted(Exception):
    pass


def _fit(run_dir, total: int, interrupt_at: int | None = None, ema_decay: float | None = None,
         history: list | None = None, runtime: Runtime = Runtime()) -> dict:
    """Train a small regression for `total` steps; with `interrupt_at`, the process "dies" at that step and a
    fresh process (new model, new optimizer) resumes from the run folder. `history` collects the weights after
    every step."""
    target = torch.nn.Linear(5, 1)
    torch.nn.init.constant_(target.weight, 0.3)
    torch.nn.init.constant_(target.bias, -0.2)

    def attempt(init_seed: int, die_at: int | None):
        torch.manual_seed(init_seed)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

        def step_loss(step: int) -> torch.Tensor:
            if step == die_at:
                raise Interrupted
            if history is not None and step > len(history):  # the weights after the previous step
                history.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            x = torch.randn(16, 5, generator=torch.Generator().manual_seed(100 + step))
            return ((model(x) - target(x).detach()) ** 2).mean()

        train(Run(run_dir, "test", {}), model, optimizer, Schedule(total, 1e-2, warmup=3), step_loss, save_every=2,
              log_every=1000, ema_decay=ema_decay, runtime=runtime)
        if history is not None:
            history.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    if interrupt_at is not None:
        with pytest.raises(Interrupted):
            attempt(0, interrupt_at)
    model = attempt(0 if interrupt_at is None else 1, None)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("runtime", [Runtime(), Runtime("cpu", torch.bfloat16)], ids=["float32", "bf16"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, runtime):
    straight = _fit(tmp_path / "straight", 9, runtime=runtime)
    resumed = _fit(tmp_path / "resumed", 9, interrupt_at=4, runtime=runtime)
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)


def test_moving_average_is_the_obvious_one_and_survives_a_resume(tmp_path):
    from multimodal.checkpoint import NATIVE_WEIGHTS, read_state_dict

    history = []
    _fit(tmp_path / "straight", 9, ema_decay=0.8, history=history)
    assert len(history) == 9
    initial = _initial_weights()  # the average starts as the model; step 0's decay is min(0.8, 1 / 10)
    expected = {k: 0.1 * initial[k].double() + 0.9 * history[0][k].double() for k in initial}
    for step, weights in enumerate(history[1:], start=1):
        decay = min(0.8, (1 + step) / (10 + step))
        expected = {k: decay * expected[k] + (1 - decay) * weights[k].double() for k in expected}
    straight = read_state_dict(tmp_path / "straight" / "ema" / NATIVE_WEIGHTS)
    for key in expected:
        torch.testing.assert_close(straight[key].double(), expected[key], rtol=1e-5, atol=1e-6)

    _fit(tmp_path / "resumed", 9, interrupt_at=4, ema_decay=0.8)
    resumed = read_state_dict(tmp_path / "resumed" / "ema" / NATIVE_WEIGHTS)
    for key in expected:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)


def _initial_weights() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_schedule_warms_up_then_decays_to_the_floor():
    schedule = Schedule(steps=100, lr=1.0, warmup=10, floor=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    values = [schedule(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert schedule(100) == pytest.approx(0.1)


def test_world_tokenizer_round_trips_world_text_with_single_digit_tokens():
    tokenizer = load_world_tokenizer()
    for name in GLM_SPECIAL_TOKENS:
        assert tokenizer.token_id(name) == tokenizer.backend.token_to_id(name)
    seed = random.Random(5).choice(split_seeds("test", 1000))  # unseen text still round-trips (byte level)
    for task in scene_tasks(make_scene(seed)):
        for text in (task.prompt, task.answer):
            assert tokenizer.decode(tokenizer.encode(text)) == text
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("[[086,540,400,760]]")]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("086540400760")  # one token per digit
    assert tokenizer.encode("<|user|>") != [tokenizer.token_id("<|user|>")]  # specials in text stay text
