"""The quality measures of the README's quality table, on the EmojiScenes test split (never trained on).

- ground: Acc@IoU0.5 of referring expressions ("Where is the dog?" -> `[[x0,y0,x1,y1]]`), as RefCOCO: the first
  box of the answer against the object's exact box.
- absent: the same questions about a class the scene lacks ("Where is the cat?"): answered as absent ("There is no
  cat in the image." / "图中没有猫。") with no box.
- caption: object-set F1 between the classes a caption names (`language.mentioned_classes`) and the scene's objects,
  averaged over captions.
- vqa: exact match of the normalised answer (case, surrounding spaces and a final full stop ignored).
- chat: the vqa questions asked as the first turn and as a follow-up after a caption request (the model's own
  caption as the first answer; the image encoded once): exact match of each, and the gap; and follow-ups that refer
  back to the turn before ("And how many cats?", "它在哪里？") after the model's own answer to that turn.
- draw: in `multimodal.evaluation_draw`.

Tasks are picked deterministically from consecutive test seeds, one per scene, alternating English and Chinese and,
in pairs, a training phrasing and a held-out one (`multimodal.phrasing`), so that every measure is also reported by
language and by phrasing split.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image

from multimodal.language import follow_ups, mentioned_classes, rephrase, scene_tasks
from multimodal.phrasing import SPLITS as PHRASING_SPLITS
from multimodal.world import WorldConfig, make_scene, render, split_seeds
from vlm.grounding import parse_grounding

BARS = {"ground": 0.90, "absent": 0.95, "caption": 0.90, "vqa": 0.85, "draw": 0.80}
MAX_NEW_TOKENS = {"ground": 24, "absent": 24, "caption": 64, "vqa": 8}
WORDINGS = ("mixed", "canonical")
TASK_KINDS = {"ground": "refer", "absent": "absent", "caption": "caption", "vqa": "vqa"}
FOLLOW_UP_GAP = 0.02  # a follow-up may lose at most this much against the same question asked first


@dataclass
class Result:
    task: str
    measure: str
    value: float
    count: int
    bar: float
    details: dict = field(default_factory=dict)
    split: str = "test"

    @property
    def passed(self) -> bool:
        return self.value >= self.bar

    def line(self) -> str:
        verdict = "meets" if self.passed else "below"
        extra = "".join(f", {k} {v:.3f}" if isinstance(v, float) else f", {k} {v}" for k, v in self.details.items())
        return f"{self.task}: {self.measure} {self.value:.3f} on {self.count} {self.split} items ({verdict} the bar " \
               f"{self.bar:.2f}){extra}"


def eval_tasks(kind: str, count: int, world: WorldConfig = WorldConfig(), offset: int = 0,
               wording: str = "mixed", split: str = "test"):
    """[(scene, task)]: one task of `kind` (a task kind, or "absent": referring to a class the scene lacks) per
    scene of `split` (test; val for decisions between models), languages alternating and, in pairs, a training
    phrasing and a held-out one; with `wording` "canonical", every question in its form's first wording ("Where is
    the dog?"), as the world's templates ask it."""
    if wording not in WORDINGS:
        raise ValueError(f"Unknown wording '{wording}'; choose one of {', '.join(WORDINGS)}.")
    wanted = {"absent": lambda t: t.kind == "refer" and t.target is None,
              "refer": lambda t: t.kind == "refer" and t.target is not None}.get(kind, lambda t: t.kind == kind)
    picked = []
    if split not in ("test", "val"):
        raise ValueError(f"Evaluate on the test or val split, not '{split}'.")
    for index, seed in enumerate(split_seeds(split, count, offset)):
        scene = make_scene(seed, world)
        lang, phrasing = ("en", "zh")[index % 2], PHRASING_SPLITS[index // 2 % 2]
        rng = random.Random(seed)
        task = rng.choice([t for t in scene_tasks(scene) if wanted(t) and t.lang == lang])
        picked.append((scene, reworded(task, rng, phrasing, wording)))
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


def answered_absent(reply: str, lang: str) -> bool:
    """Whether a reply says the asked-about thing is not there ("There is no ...", "没有"), with no box."""
    if parse_grounding(reply).boxes:
        return False
    return "没有" in reply if lang == "zh" else bool(re.search(r"\bthere (?:is|are) no\b", reply.lower()))


def in_language(reply: str, lang: str) -> bool | None:
    """Whether a reply is written in `lang` (Chinese characters for zh, Latin letters for en, not both); None for a
    reply of neither, such as a number or a bare box."""
    chinese = any("\u4e00" <= ch <= "\u9fff" for ch in reply)
    latin = bool(re.search(r"[A-Za-z]", reply))
    if not (chinese or latin):
        return None
    return chinese != latin and chinese == (lang == "zh")


def score_reply(kind: str, reply: str, scene, task) -> tuple[float, str]:
    """(score, group) of one reply: the group is the grounding outcome, the vqa topic, or "" ."""
    if kind == "ground":
        outcome = grounding_outcome(reply, scene, task.target)
        return float(outcome == "hit"), outcome
    if kind == "absent":
        return float(answered_absent(reply, task.lang)), ""
    if kind == "caption":
        return caption_f1(mentioned_classes(reply, task.lang), {obj.name for obj in scene.objects}), ""
    return float(normalise_answer(reply) == normalise_answer(task.answer)), task.topic


def grouped(scores: list[float], labels: list[str]) -> dict[str, float]:
    """{"<label> (<n>)": mean score} for each label."""
    details = {}
    for group in sorted(set(labels)):
        picked = [score for score, name in zip(scores, labels) if name == group]
        details[f"{group} ({len(picked)})"] = sum(picked) / len(picked)
    return details


def by_language_and_phrasing(scores: list[float], tasks: list) -> dict[str, float]:
    """The mean score of each language, each phrasing split, and each language within each split."""
    details = {}
    for labels in ([t.lang for t in tasks], [f"{t.split} phrasings" for t in tasks],
                   [f"{t.lang} {t.split} phrasings" for t in tasks]):
        details.update(grouped(scores, labels))
    return details


def evaluate_understanding(kind: str, answer: Answer, count: int, batch_size: int = 32,
                           wording: str = "mixed", split: str = "test") -> Result:
    """ground, absent, caption or vqa with `answer` answering a batch of questions about images.

    Details: by language and phrasing split (training phrasings against held-out ones); for ground, the shares of
    `GROUNDING_MISSES` and the accuracy of expressions that name a class alone ("the dog") apart from those that add
    a region because the class repeats ("the dog on the left"); for vqa, the accuracy of each question topic (count,
    presence, background, neighbour, wearing, size), presence also by the right answer (yes, no); and the share of
    worded replies (not a bare number or box) in the question's language."""
    items = eval_tasks(TASK_KINDS[kind], count, wording=wording, split=split)
    scores, outcomes, groups, tasks, languages = [], [], [], [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        replies = answer([render(scene) for scene, _ in chunk], [task.prompt for _, task in chunk],
                         MAX_NEW_TOKENS[kind])
        for (scene, task), reply in zip(chunk, replies):
            score, group = score_reply(kind, reply, scene, task)
            languages.append(in_language(reply, task.lang))
            scores.append(score)
            tasks.append(task)
            if kind == "ground":
                outcomes.append(group)
                repeated = scene.count(scene.objects[task.target].name) > 1
                groups.append("with-region Acc" if repeated else "class-only Acc")
            elif kind == "vqa":
                groups.append(f"{group} Acc")
    measure = {"ground": "Acc@IoU0.5", "absent": "answered absent with no box", "caption": "object-set F1",
               "vqa": "exact match"}[kind]
    details = {f"{miss} share": outcomes.count(miss) / len(outcomes) for miss in GROUNDING_MISSES} if outcomes else {}
    details.update(grouped(scores, groups))
    if kind == "vqa":
        presence = [(score, task) for score, task in zip(scores, tasks) if task.topic == "presence"]
        details.update(grouped([score for score, _ in presence],
                               [f"presence ({'yes' if t.answer in ('yes', '有') else 'no'}) Acc" for _, t in presence]))
    details.update(by_language_and_phrasing(scores, tasks))
    worded = [same for same in languages if same is not None]
    if worded:
        details[f"in the question's language ({len(worded)})"] = sum(worded) / len(worded)
    return Result(kind, measure, sum(scores) / len(scores), len(scores), BARS[kind], details, split)


def evaluate_follow_ups(answer: AnswerTurns, count: int, batch_size: int = 32, wording: str = "mixed",
                        split: str = "test") -> Result:
    """The vqa questions as the first turn, and again as the second turn after a caption request (in the question's
    language and phrasing split) answered by the model itself. The value is the follow-up accuracy; the bar is the
    first-turn accuracy less `FOLLOW_UP_GAP`.

    Details: the same by language and phrasing split, and questions that refer back to the turn before ("And how
    many cats?", "What is it wearing?", "它在哪里？"), asked after the model's own answer to that turn: exact match,
    or for "Where is it?" a hit (or absent, when the class is)."""
    items = eval_tasks("vqa", count, wording=wording, split=split)
    first, follow, back = [], [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images = [render(scene) for scene, _ in chunk]
        openers = [reworded(next(t for t in scene_tasks(scene) if t.kind == "caption" and t.lang == task.lang),
                            random.Random(scene.seed), task.split, wording).prompt for scene, task in chunk]
        captions = answer(images, [[("user", opener)] for opener in openers], MAX_NEW_TOKENS["caption"])
        alone = answer(images, [[("user", task.prompt)] for _, task in chunk], MAX_NEW_TOKENS["vqa"])
        after = answer(images, [[("user", opener), ("assistant", caption), ("user", task.prompt)]
                                for opener, caption, (_, task) in zip(openers, captions, chunk)], MAX_NEW_TOKENS["vqa"])
        for (_, task), reply_alone, reply_after in zip(chunk, alone, after):
            expected = normalise_answer(task.answer)
            first.append(float(normalise_answer(reply_alone) == expected))
            follow.append(float(normalise_answer(reply_after) == expected))
        pairs = [back_reference(scene, task, wording) for scene, task in chunk]
        leads = answer(images, [[("user", lead.prompt)] for lead, _ in pairs], MAX_NEW_TOKENS["ground"])
        replies = answer(images, [[("user", lead.prompt), ("assistant", reply), ("user", then.prompt)]
                                  for (lead, then), reply in zip(pairs, leads)], MAX_NEW_TOKENS["ground"])
        for (scene, _), (_, then), reply in zip(chunk, pairs, replies):
            kind = "vqa" if then.kind == "vqa" else "ground" if then.target is not None else "absent"
            back.append((score_reply(kind, reply, scene, then)[0], then))
    tasks = [task for _, task in items]
    first_turn, follow_up = sum(first) / len(first), sum(follow) / len(follow)
    details = {"first-turn exact match": first_turn, "gap": first_turn - follow_up}
    details.update({f"follow-up {key}": value for key, value in by_language_and_phrasing(follow, tasks).items()})
    details.update({f"first-turn {key}": value for key, value in by_language_and_phrasing(first, tasks).items()})
    details["referring back Acc"] = sum(score for score, _ in back) / len(back)
    details.update({f"referring back, {key}": value
                    for key, value in grouped([score for score, _ in back], [t.form for _, t in back]).items()})
    return Result("chat", "follow-up exact match", follow_up, len(follow), first_turn - FOLLOW_UP_GAP, details,
                  split)


def back_reference(scene, task, wording: str = "mixed"):
    """A (question, follow-up referring back to it) pair about `scene`, in `task`'s language and phrasing split,
    picked by the scene's seed."""
    rng = random.Random(scene.seed + 1)
    lead, then = rng.choice(follow_ups(scene, task.lang, rng))
    return reworded(lead, rng, task.split, wording), reworded(then, rng, task.split, wording)


def reworded(task, rng: random.Random, split: str, wording: str):
    """`task` in a phrasing of `split`, or as it is for the "canonical" wording."""
    return rephrase(task, rng, split) if wording == "mixed" else task
