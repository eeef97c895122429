"""`multimodal train recipe`: every embedded model in one command: the VLM (language, tower and vision stages), the
judge and the three DiTs on the VLM's frozen text encoder, then the export as a suite folder and its evaluation.

Sized for one GPU (`--device cuda`): the default step counts are the CPU recipe's, and `--scale` multiplies them
(a tiny `--scale` makes the same pipeline a smoke test on the CPU). Writes `OUT/runs/` (resumable run folders),
`OUT/suite/` (what `--checkpoint` and `multimodal train export` read) and `OUT/recipe.json` (each stage's time and
every measure).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class RecipeSteps:
    vlm_language: int = 400
    vlm_tower: int = 2000
    vlm_vision: int = 40000
    judge: int = 3600
    diffusion: int = 10000

    def scaled(self, scale: float) -> RecipeSteps:
        return RecipeSteps(**{name: max(1, round(value * scale)) for name, value in asdict(self).items()})


def run_recipe(out: Path, tokenizer_file: Path, device: str = "cpu", steps: RecipeSteps = RecipeSteps(), seed: int = 0,
               eval_count: int = 1000, draw_count: int = 200, scenes: int = 20000) -> dict:
    """Train, export and evaluate; returns (and writes to OUT/recipe.json) the stage times and the measures."""
    from glm.tokenizer import GLMTokenizer
    from multimodal.training import diffusion, judge, vlm
    from multimodal.training.export import export_suite

    tokenizer = GLMTokenizer.load(tokenizer_file)
    runs, suite = Path(out) / "runs", Path(out) / "suite"
    seconds = {}

    def timed(name, fn):
        start = time.monotonic()
        fn()
        seconds[name] = round(time.monotonic() - start, 1)
        print(f"recipe: {name} took {seconds[name]:.0f} s", flush=True)

    timed("vlm", lambda: vlm.train_vlm(runs / "vlm", tokenizer, seed=seed, steps=steps.vlm_vision,
                                       language_steps=steps.vlm_language, tower_steps=steps.vlm_tower, scenes=scenes,
                                       settings=vlm.RECIPE.settings("fast", device)))
    timed("judge", lambda: judge.train_judge(runs / "judge", tokenizer, seed=seed, steps=steps.judge, scenes=scenes,
                                             settings=judge.RECIPE.settings("fast", device)))
    timed("diffusion", lambda: diffusion.train_diffusion(runs / "diffusion", tokenizer, runs / "vlm", seed=seed,
                                                         steps=steps.diffusion, scenes=scenes,
                                                         settings=diffusion.RECIPE.settings("fast", device)))
    timed("export", lambda: export_suite(runs, tokenizer_file, suite))
    measures = {}
    timed("eval", lambda: measures.update(evaluate_suite(suite, device, eval_count, draw_count)))
    record = {"device": device, "steps": asdict(steps), "seconds": seconds, "measures": measures}
    (Path(out) / "recipe.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return record


def evaluate_suite(suite: Path, device: str, count: int, draw_count: int) -> dict:
    """Every measure of `multimodal eval` on a suite folder: {task: (value, details)}."""
    from diffusion.pipeline import load_dit
    from multimodal.engine import Engine
    from multimodal.evaluation import answer_turns_with, answer_with, evaluate_follow_ups, evaluate_understanding
    from multimodal.evaluation_draw import evaluate_draw
    from multimodal.judge import load_judge

    engine = Engine.load(suite, device=device)
    results = [evaluate_understanding(kind, answer_with(engine.chat_model), count)
               for kind in ("ground", "absent", "caption", "vqa")]
    results.append(evaluate_follow_ups(answer_turns_with(engine.chat_model), count))
    judge = load_judge(suite / "judge", engine.chat_model.tokenizer)
    results.append(evaluate_draw(engine.painter, load_dit(suite / "diffusion" / "single").to(device), judge,
                                 draw_count, answer_with(engine.chat_model))[0])
    for result in results:
        print(result.line(), flush=True)
    return {result.task: {"value": result.value, "count": result.count, **result.details} for result in results}
