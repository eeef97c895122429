"""The quality measures of the README's quality table, on the EmojiScenes test split (never trained on).

- ground: Acc@IoU0.5 of referring expressions ("Where is the dog?" -> `[[x0,y0,x1,y1]]`), as RefCOCO: the first
  box of the answer against the object's exact box.
- caption: object-set F1 between the classes a caption names (`language.mentioned_classes`) and the scene's objects,
  averaged over captions.
- vqa: exact match of the normalised answer (case, surrounding spaces and a final full stop ignored).
- chat: the vqa questions asked as the first turn and as a follow-up after "Describe the image." (the model's own
  caption as the first answer; the image encoded once): exact match of each, and the gap.
- draw: in `multimodal.evaluation_draw`.

Tasks are picked deterministically from consecutive test seeds, one per scene, alternating English and Chinese.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image

from multimodal.language import mentioned_classes, scene_tasks
from multimodal.world import WorldConfig, make_scene, render, split_seeds
from vlm.grounding import parse_grounding

BARS = {"ground": 0.90, "caption": 0.90, "vqa": 0.85, "draw": 0.80}
MAX_NEW_TOKENS = {"ground": 24, "caption": 64, "vqa": 8}
FOLLOW_UP_GAP = 0.02  # a follow-up may lose at most this much against the same question asked first


@dataclass
class Result:
    task: str
    measure: str
    value: float
    count: int
    bar: float
    details: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.value >= self.bar

    def line(self) -> str:
        verdict = "meets" if self.passed else "below"
        extra = "".join(f", {k} {v:.3f}" if isinstance(v, float) else f", {k} {v}" for k, v in self.details.items())
        return f"{self.task}: {self.measure} {self.value:.3f} on {self.count} test items ({verdict} the bar " \
               f"{self.bar:.2f}){extra}"


def eval_tasks(kind: str, count: int, world: WorldConfig = WorldConfig(), offset: int = 0):
    """[(scene, task)]: one task of `kind` per test scene, languages alternating."""
    picked = []
    for index, seed in enumerate(split_seeds("test", count, offset)):
        scene = make_scene(seed, world)
        lang = ("en", "zh")[index % 2]
        options = [t for t in scene_tasks(scene) if t.kind == kind and t.lang == lang]
        picked.append((scene, random.Random(seed).choice(options)))
    return picked


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def normalise_answer(text: str) -> str:
    return text.strip().rstrip(".。").strip().lower()


def caption_f1(predicted: set[str], expected: set[str]) -> float:
    if not predicted and not expected:
        return 1.0
    hits = len(predicted & expected)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(expected)
    return 2 * precision * recall / (precision + recall)


Answer = Callable[[list[Image.Image], list[str], int], list[str]]  # (images, questions, max_new_tokens) -> answers
# (images, conversations of (role, text) turns ending with the user's, max_new_tokens) -> answers
AnswerTurns = Callable[[list[Image.Image], list[list[tuple[str, str]]], int], list[str]]


def answer_turns_with(chat_model) -> AnswerTurns:
    """An `AnswerTurns` from a `vlm.chat.VLMChat`: greedy replies, one padded batch."""
    from multimodal.engine import Sampling

    def answer(images, conversations, max_new_tokens):
        return chat_model.answer_batch(images, conversations, Sampling(max_new_tokens=max_new_tokens))

    return answer


def answer_with(chat_model) -> Answer:
    """An `Answer` from a `vlm.chat.VLMChat`: greedy replies to single-turn questions, one padded batch."""
    answer_turns = answer_turns_with(chat_model)

    def answer(images, questions, max_new_tokens):
        return answer_turns(images, [[("user", question)] for question in questions], max_new_tokens)

    return answer


GROUNDING_MISSES = ("another object's box", "loose box", "no box")


def grounding_outcome(reply: str, scene, target: int) -> str:
    """How a grounding reply did: a hit (its first box has IoU >= 0.5 with the target's), or one of
    `GROUNDING_MISSES`: it boxed another object of the scene (IoU >= 0.5 with that object's box), it drew a loose box
    that matches no object, or it gave no box."""
    boxes = parse_grounding(reply).boxes
    if not boxes:
        return "no box"
    box = boxes[0][1]
    if iou(box, scene.box_per_mille(target)) >= 0.5:
        return "hit"
    others = (index for index in range(len(scene.objects)) if index != target)
    return "another object's box" if any(iou(box, scene.box_per_mille(i)) >= 0.5 for i in others) else "loose box"


def evaluate_understanding(kind: str, answer: Answer, count: int, batch_size: int = 32) -> Result:
    """ground, caption or vqa with `answer` answering a batch of questions about images.

    Details: for ground, the shares of `GROUNDING_MISSES` and the accuracy of expressions that name a class alone
    ("the dog") apart from those that add a region because the class repeats ("the dog on the left"); for vqa, the
    accuracy of each question topic (count, presence, background, neighbour, wearing, size)."""
    task_kind = {"ground": "refer", "caption": "caption", "vqa": "vqa"}[kind]
    items = eval_tasks(task_kind, count)
    scores, outcomes, groups, languages = [], [], [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        replies = answer([render(scene) for scene, _ in chunk], [task.prompt for _, task in chunk],
                         MAX_NEW_TOKENS[kind])
        for (scene, task), reply in zip(chunk, replies):
            languages.append(task.lang)
            if kind == "ground":
                outcomes.append(grounding_outcome(reply, scene, task.target))
                scores.append(float(outcomes[-1] == "hit"))
                repeated = scene.count(scene.objects[task.target].name) > 1
                groups.append("with-region Acc" if repeated else "class-only Acc")
            elif kind == "caption":
                expected = {obj.name for obj in scene.objects}
                scores.append(caption_f1(mentioned_classes(reply, task.lang), expected))
            else:
                scores.append(float(normalise_answer(reply) == normalise_answer(task.answer)))
                groups.append(f"{task.topic} Acc")
    measure = {"ground": "Acc@IoU0.5", "caption": "object-set F1", "vqa": "exact match"}[kind]
    details = {f"{miss} share": outcomes.count(miss) / len(outcomes) for miss in GROUNDING_MISSES} if outcomes else {}
    for labels in (groups, languages):
        for group in sorted(set(labels)):
            picked = [score for score, name in zip(scores, labels) if name == group]
            details[f"{group} ({len(picked)})"] = sum(picked) / len(picked)
    return Result(kind, measure, sum(scores) / len(scores), len(scores), BARS[kind], details)


def evaluate_follow_ups(answer: AnswerTurns, count: int, batch_size: int = 32) -> Result:
    """The vqa questions as the first turn, and again as the second turn after "Describe the image." (in the
    question's language) answered by the model itself. The value is the follow-up accuracy; the bar is the
    first-turn accuracy less `FOLLOW_UP_GAP`."""
    from multimodal.language import CAPTION_PROMPTS

    items = eval_tasks("vqa", count)
    first, follow = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images = [render(scene) for scene, _ in chunk]
        openers = [CAPTION_PROMPTS[task.lang] for _, task in chunk]
        captions = answer(images, [[("user", opener)] for opener in openers], MAX_NEW_TOKENS["caption"])
        alone = answer(images, [[("user", task.prompt)] for _, task in chunk], MAX_NEW_TOKENS["vqa"])
        after = answer(images, [[("user", opener), ("assistant", caption), ("user", task.prompt)]
                                for opener, caption, (_, task) in zip(openers, captions, chunk)], MAX_NEW_TOKENS["vqa"])
        for (_, task), reply_alone, reply_after in zip(chunk, alone, after):
            expected = normalise_answer(task.answer)
            first.append(float(normalise_answer(reply_alone) == expected))
            follow.append(float(normalise_answer(reply_after) == expected))
    first_turn, follow_up = sum(first) / len(first), sum(follow) / len(follow)
    return Result("chat", "follow-up exact match", follow_up, len(follow), first_turn - FOLLOW_UP_GAP,
                  {"first-turn exact match": first_turn, "gap": first_turn - follow_up})
