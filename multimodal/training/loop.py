"""What every training loop shares: train-split scenes, checkpoints that resume, a schedule, progress lines.

A run lives in one folder: `model/` (our native format, the weights the commands load), `ema/` when the run keeps an
exponential moving average of them, `trainer.pt` (optimizer state and step, read back with `weights_only=True`)
and `log.txt`. Batches are drawn from an rng seeded by
(run seed, step), so a resumed run continues exactly where an uninterrupted one would have been.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from multimodal.checkpoint import NATIVE_WEIGHTS, check_state_dict, read_state_dict, save_native
from multimodal.training.parallel import average_gradients, average_scalars, is_main, world
from multimodal.world import Scene, WorldConfig, make_scene, render, split_of, split_seeds


def scene_image(scene: Scene, size: int) -> Image.Image:
    """The scene rendered and resized (antialiased) to the model's square size."""
    image = render(scene)
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BICUBIC)


def scene_pixels(scene: Scene, size: int) -> torch.Tensor:
    """[3, S, S] uint8: `scene_image` as a tensor."""
    return torch.from_numpy(np.asarray(scene_image(scene, size)).copy()).permute(2, 0, 1)


class TrainScenes:
    """The first `count` scenes of the train split at `image_size`, as uint8 tensors: rendered lazily and kept in
    memory, or with `cached`, read from the memory-mapped scene cache (`multimodal.training.data.SceneCache`) that
    is built once and shared by every run.

    Only train seeds ever enter: the constructor takes seeds from the train split and `batch_seeds` asserts it again
    for every seed it hands out, so no test or validation scene can reach a gradient.
    """

    def __init__(self, count: int, image_size: int, world: WorldConfig = WorldConfig(), cached: bool = False):
        self.seeds = split_seeds("train", count)
        self.image_size = image_size
        self.world = world
        self._scenes: dict[int, Scene] = {}
        self._pixels: dict[int, torch.Tensor] = {}
        self._cache = None
        if cached:
            from multimodal.training.data import SceneCache

            self._cache = SceneCache(world, "train", image_size, count)
            self._scenes = {scene.seed: scene for scene in self._cache.scenes}

    def scene(self, seed: int) -> Scene:
        if seed not in self._scenes:
            self._scenes[seed] = make_scene(seed, self.world)
        return self._scenes[seed]

    def pixels(self, seed: int) -> torch.Tensor:
        """[3, S, S] uint8."""
        if self._cache is not None:
            return self._cache.image(seed - self.seeds.start)
        if seed not in self._pixels:
            self._pixels[seed] = scene_pixels(self.scene(seed), self.image_size)
        return self._pixels[seed]

    def batch_seeds(self, rng: random.Random, batch_size: int) -> list[int]:
        seeds = [self.seeds[rng.randrange(len(self.seeds))] for _ in range(batch_size)]
        for seed in seeds:
            assert split_of(seed) == "train", f"seed {seed} is not a train seed"
        return seeds

    def images(self, seeds: list[int]) -> torch.Tensor:
        """[B, 3, S, S] float in [-1, 1]."""
        return torch.stack([self.pixels(seed) for seed in seeds]).float() / 127.5 - 1


class MixedScenes:
    """Several TrainScenes pools behind TrainScenes' interface: each scene of a batch comes from pool i with
    probability shares[i]. Seeds repeat across worlds, so a scene is named by a (pool index, seed) pair."""

    def __init__(self, pools: list[TrainScenes], shares: list[float]):
        if len(pools) != len(shares) or abs(sum(shares) - 1) > 1e-9:
            raise ValueError(f"MixedScenes needs one share per pool, summing to 1; got {shares}.")
        self.pools, self.shares = pools, shares

    def batch_seeds(self, rng: random.Random, batch_size: int) -> list[tuple[int, int]]:
        picks = rng.choices(range(len(self.pools)), weights=self.shares, k=batch_size)
        return [(i, self.pools[i].batch_seeds(rng, 1)[0]) for i in picks]

    def scene(self, key: tuple[int, int]) -> Scene:
        return self.pools[key[0]].scene(key[1])

    def pixels(self, key: tuple[int, int]) -> torch.Tensor:
        return self.pools[key[0]].pixels(key[1])

    def images(self, keys: list[tuple[int, int]]) -> torch.Tensor:
        return torch.stack([self.pixels(key) for key in keys]).float() / 127.5 - 1


class ValidationScenes(TrainScenes):
    """The first `count` scenes of the validation split, with TrainScenes' interface: for measuring a loss on scenes
    no gradient has seen (`multimodal bench train`). Its batches assert the validation split."""

    def __init__(self, count: int, image_size: int, world: WorldConfig = WorldConfig()):
        super().__init__(0, image_size, world)
        self.seeds = split_seeds("val", count)

    def batch_seeds(self, rng: random.Random, batch_size: int) -> list[int]:
        seeds = [self.seeds[rng.randrange(len(self.seeds))] for _ in range(batch_size)]
        assert all(split_of(seed) == "val" for seed in seeds)
        return seeds


def native_bf16(device: str = "cpu") -> bool:
    """Whether this device multiplies bfloat16 matrices natively (AVX512_BF16 or AMX on x86; Ampere or newer)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@dataclass(frozen=True)
class Runtime:
    """How a training step runs: on which device and under which autocast dtype (float32 master weights and
    optimizer state either way). Under CPU bf16, attention takes the explicit path of `kernels.attention`."""

    device: str = "cpu"
    autocast: torch.dtype | None = None

    @classmethod
    def fast(cls, device: str = "cpu") -> Runtime:
        """bf16 autocast where the device has native bf16, float32 elsewhere."""
        return cls(device, torch.bfloat16 if native_bf16(device) else None)

    def describe(self) -> str:
        return f"{self.device}, {'bf16 autocast' if self.autocast == torch.bfloat16 else 'float32'}"

    def context(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=self.autocast)


def default_threads() -> int:
    """The cores this process may run on: training uses them all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def scaled_lr(base_lr: float, batch_size: int, base_batch: int = 16) -> float:
    """The rule for a batch other than the one a recipe was tuned at: the linear scaling rule (Goyal et al. 2017),
    lr x batch / base_batch, with the warmup kept in samples. It keeps the sum of learning rates per sample seen
    equal, which is what matched the reference loop's loss per sample in `multimodal bench train` (the square-root
    rule fell behind)."""
    return base_lr * batch_size / base_batch


def length_groups(lengths: list[int], groups: int) -> list[list[int]]:
    """The indices of `lengths` (rows of a batch) in at most `groups` groups of consecutive lengths, sorted, cut where
    the padded total (each group padded to its longest) is least; one group, in batch order, when `groups` is 1."""
    if groups <= 1 or len(lengths) <= 1:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ordered = [lengths[i] for i in order]
    # best[g][end]: (padded total, cut points) of the first `end` sorted rows in g groups
    best = [[(0, ())] + [(math.inf, ())] * len(ordered)]
    for _ in range(min(groups, len(ordered))):
        previous = best[-1]
        best.append([(0, ())] + [min((previous[start][0] + (end - start) * ordered[end - 1], previous[start][1] +
                                      (start,)) for start in range(end)) for end in range(1, len(ordered) + 1)])
    cuts = min(level[-1] for level in best[1:])[1] + (len(ordered),)
    return [order[start:end] for start, end in zip(cuts, cuts[1:]) if end > start]


LENGTH_GROUPS = 2  # the fast loop's groups of similar length within a batch (`length_groups`)


@dataclass(frozen=True)
class LoopSettings:
    """How a training loop is fed and run: batch, peak learning rate, runtime, whether scenes (and, for
    text-conditioned models, text states) come from the caches of `multimodal.training.data`, and in how many
    groups of similar length a batch of token rows runs (`length_groups`)."""

    batch_size: int
    lr: float
    runtime: Runtime
    cached: bool
    groups: int = 1

    def schedule(self, steps: int, warmup_samples: int) -> Schedule:
        """`steps` optimizer steps; the warmup is given in samples so it means the same at any batch."""
        return Schedule(steps, self.lr, warmup=max(1, warmup_samples // self.batch_size))


@dataclass(frozen=True)
class LoopRecipe:
    """What a model's loop was tuned at, and the batch its fast loop runs."""

    base_batch: int
    base_lr: float
    fast_batch: int

    def settings(self, loop: str = "fast", device: str = "cpu", batch_size: int | None = None,
                 lr: float | None = None) -> LoopSettings:
        """"reference": the loop as it first ran (float32, eager, data made inside the loop, the base batch); "fast":
        native bf16 autocast, cached data, the fast batch and rows in groups of similar length. `lr` is the peak
        rate at the base batch; a larger batch scales it by `scaled_lr`'s rule."""
        lr = lr or self.base_lr
        if loop == "reference":
            batch = batch_size or self.base_batch
            return LoopSettings(batch, scaled_lr(lr, batch, self.base_batch), Runtime(device), cached=False)
        if loop != "fast":
            raise ValueError(f"Unknown training loop '{loop}'; use fast or reference.")
        batch = batch_size or self.fast_batch
        return LoopSettings(batch, scaled_lr(lr, batch, self.base_batch), Runtime.fast(device), cached=True,
                            groups=LENGTH_GROUPS)


@dataclass
class Schedule:
    steps: int
    lr: float
    warmup: int = 200
    floor: float = 0.1  # the final learning rate, as a fraction of the peak

    def __call__(self, step: int) -> float:
        """Linear warmup, then cosine decay to `floor x lr` at `steps`."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.lr * (self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """An exponential moving average of a model's weights, with the usual warmup: the decay is
    min(decay, (1 + step) / (10 + step)), so early averages do not drag the random initialisation along."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.average = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for average, current in zip(self.average.parameters(), model.parameters(), strict=True):
            average.lerp_(current, 1 - decay)


class Run:
    """A run folder: saves and resumes the model, optimizer and step; prints and logs progress."""

    def __init__(self, out_dir: str | Path, kind: str, config: dict):
        self.out_dir = Path(out_dir)
        self.kind = kind
        self.config = config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._started = time.monotonic()

    @property
    def model_dir(self) -> Path:
        return self.out_dir / "model"

    @property
    def ema_dir(self) -> Path:
        return self.out_dir / "ema"

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               extra: torch.nn.Module | None = None, ema: EMA | None = None) -> int:
        """Load the last checkpoint if there is one (and `extra`, a training-only module, and the average); return
        the step to continue from."""
        trainer = self.out_dir / "trainer.pt"
        if not trainer.exists():
            return 0
        # Copy into the existing parameters (no assign): the optimizer holds references to them.
        weights = read_state_dict(self.model_dir / NATIVE_WEIGHTS)
        check_state_dict(model, weights)
        model.load_state_dict(dict(weights), strict=True)
        if ema is not None:
            averaged = self.ema_dir / NATIVE_WEIGHTS
            ema.average.load_state_dict(dict(read_state_dict(averaged)) if averaged.exists() else model.state_dict())
        state = torch.load(trainer, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        if extra is not None:
            extra.load_state_dict(state["extra"])
        self.log(f"resumed {self.kind} at step {state['step']}")
        return int(state["step"])

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
             extra: torch.nn.Module | None = None, ema: EMA | None = None) -> None:
        if not is_main():  # every process holds the same weights; the first writes them
            return
        # Write the trainer state last: a run killed mid-save resumes from the previous, complete checkpoint.
        save_native(model.state_dict(), {**self.config, "step": step}, self.model_dir, self.kind)
        if ema is not None:
            save_native(ema.average.state_dict(), {**self.config, "step": step, "ema_decay": ema.decay},
                        self.ema_dir, self.kind)
        tmp = self.out_dir / "trainer.pt.tmp"
        state = {"optimizer": optimizer.state_dict(), "step": step}
        if extra is not None:
            state["extra"] = extra.state_dict()
        torch.save(state, tmp)
        tmp.replace(self.out_dir / "trainer.pt")

    def log(self, line: str) -> None:
        if not is_main():
            return
        stamped = f"[{time.strftime('%H:%M:%S')} +{(time.monotonic() - self._started) / 60:.1f}m] {line}"
        print(stamped, flush=True)
        with open(self.out_dir / "log.txt", "a") as handle:
            handle.write(stamped + "\n")


def train(
    run: Run,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    step_loss: Callable[[int], torch.Tensor],
    save_every: int = 200,
    log_every: int = 20,
    minutes: float | None = None,
    evaluate: Callable[[], str] | None = None,
    evaluate_every: int = 1000,
    extra: torch.nn.Module | None = None,
    ema_decay: float | None = None,
    runtime: Runtime = Runtime(),
    batch_size: int | None = None,
) -> int:
    """The loop: `step_loss(step)` builds the batch of that step and returns its loss, or (loss, components) with
    named floats to log beside it; stops after `schedule.steps` steps or `minutes` of wall time, saving on the way
    out. The step runs under `runtime`'s autocast and attention kernel. `extra` is a training-only module (an
    auxiliary head) whose weights go into the trainer state, not the model; with `ema_decay` the run also keeps and
    saves an exponential moving average of the model. With `batch_size` the progress line shows samples/s.
    In a process group (`multimodal.training.parallel`) each process's `step_loss` builds its share of the batch and
    the gradients are averaged before the step. Returns the step reached."""
    processes = world()[1]
    ema = None if ema_decay is None or not is_main() else EMA(model, ema_decay)
    step = run.resume(model, optimizer, extra, ema)
    deadline = None if minutes is None else time.monotonic() + 60 * minutes
    window_loss, window_parts, window_start = 0.0, {}, time.monotonic()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    run.log(f"{run.kind} from step {step}: {runtime.describe()}, {torch.get_num_threads()} threads"
            + (f" in each of {processes} processes" if processes > 1 else ""))
    while step < schedule.steps:
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        with runtime.context():
            loss = step_loss(step)
        if isinstance(loss, tuple):
            loss, parts = loss
            for name, value in parts.items():  # a component may be measured on some steps only
                total, count = window_parts.get(name, (0.0, 0))
                window_parts[name] = (total + value, count + 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        out_of_time = deadline is not None and time.monotonic() > deadline
        if processes > 1:  # every process leaves at the same step, or the next all-reduce would wait forever
            out_of_time = average_gradients(params, out_of_time)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if ema is not None:
            ema.update(model, step)
        step += 1
        window_loss += loss.item()
        if step % log_every == 0:
            rate = log_every / (time.monotonic() - window_start)
            names = sorted(window_parts)  # the same components on the same steps in every process
            means = average_scalars([window_loss] + [window_parts[n][0] / window_parts[n][1] for n in names])
            window_loss, parts = means[0], "".join(f" {name} {mean:.4f}" for name, mean in zip(names, means[1:]))
            speed = f"{rate:.2f} steps/s" + (f" {rate * batch_size:.1f} samples/s" if batch_size else "")
            run.log(f"step {step}/{schedule.steps} loss {window_loss / log_every:.4f}{parts} lr {schedule(step):.2e} "
                    f"{speed}")
            window_loss, window_parts, window_start = 0.0, {}, time.monotonic()
        if evaluate is not None and step % evaluate_every == 0 and is_main():
            model.eval()
            run.log(f"step {step} eval: {evaluate()}")
            model.train()
        if step % save_every == 0:
            run.save(model, optimizer, step, extra, ema)
        if out_of_time:
            run.log(f"time budget of {minutes} minutes reached at step {step}")
            break
    run.save(model, optimizer, step, extra, ema)
    model.eval()
    return step
