"""The world's many wordings: phrasings per form with a held-out set that no training batch sees, absent objects,
follow-ups that refer back, and the evaluation's split by language and phrasing."""

import random
import string

import pytest

from multimodal.language import absent_answer, follow_ups, rephrase, scene_tasks
from multimodal.phrasing import PHRASINGS, WRAPPERS, _pieces, perturb, perturbed_phrase, phrase, phrasing_split, splice
from multimodal.world import CLASSES, make_scene, split_of, split_seeds
from vlm.grounding import format_boxes, parse_grounding

QUESTION_KINDS = {"caption": ["caption"], "grounded_caption": ["grounded_caption"], "refer": ["refer"],
                  "vqa": ["count", "presence", "background", "neighbour", "wearing", "size"]}


def slots_of(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


@pytest.mark.parametrize("kind", sorted(QUESTION_KINDS))
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_each_task_kind_has_at_least_15_phrasings_with_a_disjoint_held_out_set(kind, lang):
    forms = [PHRASINGS[form][lang] for form in QUESTION_KINDS[kind]]
    train = [p for f in forms for p in f.train]
    held_out = [p for f in forms for p in f.held_out]
    assert len(set(train)) == len(train) and len(set(held_out)) == len(held_out)
    assert len(train) + len(held_out) >= 15 and len(held_out) >= 2
    assert not set(train) & set(held_out)
    for form in forms:  # every phrasing of a form names what the canonical one names, so any one can word any task
        named = slots_of(form.train[0])
        for phrasing in form.train + form.held_out:
            assert named - {"be", "measure"} <= slots_of(phrasing) <= named


def test_chinese_questions_are_chinese_and_english_ones_english():
    for form in PHRASINGS.values():
        for template in form["zh"].train + form["zh"].held_out:
            assert any("\u4e00" <= ch <= "\u9fff" for ch in template) and template[-1] in "？。"
        for template in form["en"].train + form["en"].held_out:
            assert template.isascii() and template[-1] in "?."


@pytest.mark.parametrize("name,measure,zh_count,en_count", [
    ("dog", "只", "图中有几只狗？", "How many dogs are there?"),
    ("cow", "头", "图中有几头奶牛？", "How many cows are there?"),
    ("fish", "条", "图中有几条鱼？", "How many fish are there?"),
    ("car", "辆", "图中有几辆汽车？", "How many cars are there?"),
    ("mouse", "只", "图中有几只老鼠？", "How many mice are there?"),
    ("fox", "只", "图中有几只狐狸？", "How many foxes are there?"),
    ("horse", "匹", "图中有几匹马？", "How many horses are there?"),
    ("sailboat", "艘", "图中有几艘帆船？", "How many sailboats are there?"),
    ("sunflower", "朵", "图中有几朵向日葵？", "How many sunflowers are there?"),
    ("cherry", "颗", "图中有几颗樱桃？", "How many cherries are there?"),
])
def test_counting_questions_use_the_plural_and_the_measure_word(name, measure, zh_count, en_count):
    cls = CLASSES[name]
    assert cls.measure == measure
    assert PHRASINGS["count"]["zh"].train[0].format(measure=cls.measure, name=cls.zh) == zh_count
    assert PHRASINGS["count"]["en"].train[0].format(plural=cls.plural) == en_count


@pytest.mark.parametrize("name,en,zh", [
    ("cat", "There is no cat in the image.", "图中没有猫。"),
    ("sunglasses", "There are no sunglasses in the image.", "图中没有墨镜。"),
    ("ice cream", "There is no ice cream in the image.", "图中没有冰激凌。"),
])
def test_absent_answers(name, en, zh):
    assert absent_answer(name, "en") == en and absent_answer(name, "zh") == zh


def test_every_scene_asks_about_an_absent_class_in_both_languages():
    for seed in split_seeds("train", 40):
        scene = make_scene(seed)
        absent = [t for t in scene_tasks(scene) if t.kind == "refer" and t.target is None]
        assert sorted(t.lang for t in absent) == ["en", "zh"]
        for task in absent:
            assert not parse_grounding(task.answer).boxes
            thing = dict(task.slots)["thing"]
            (name,) = {n for n, c in CLASSES.items() if thing in (f"the {n}", c.zh)}
            assert scene.count(name) == 0 and task.answer == absent_answer(name, task.lang)


def test_presence_questions_are_balanced_between_yes_and_no():
    answers = [t.answer for seed in split_seeds("train", 200) for t in scene_tasks(make_scene(seed))
               if t.topic == "presence"]
    assert answers.count("yes") == answers.count("no") == answers.count("有") == answers.count("没有") == 200


def test_rephrasing_keeps_the_task_and_reports_its_split():
    scene = make_scene(split_seeds("train", 1)[0])
    for task in scene_tasks(scene):
        if task.kind == "draw":
            continue
        assert task.split == "train" and task.prompt == PHRASINGS[task.form][task.lang].train[0].format(
            **dict(task.slots))
        for split in ("train", "held-out"):
            other = rephrase(task, random.Random(5), split)
            assert other.split == split and other.answer == task.answer and other.target == task.target
    with pytest.raises(ValueError, match="no phrasing"):
        phrasing_split("refer", "en", "Whereabouts is the dog?", {"thing": "the dog", "be": "is"})


def test_follow_ups_refer_back_and_their_answers_agree_with_the_scene():
    forms = set()
    for seed in split_seeds("train", 60):
        scene = make_scene(seed)
        for lang in ("en", "zh"):
            for lead, then in follow_ups(scene, lang, random.Random(seed)):
                forms.add(then.form)
                assert lead.lang == then.lang == lang
                if then.form == "count_again":
                    named = dict(then.slots)["plural" if lang == "en" else "name"]
                    (name,) = {n for n, c in CLASSES.items() if named in (c.plural, c.zh)}
                    assert then.answer == str(scene.count(name)) and lead.form == "count"
                elif then.form == "where_it":
                    assert lead.form == "presence"
                    if lead.answer in ("yes", "有"):
                        assert then.answer == format_boxes([scene.box_per_mille(then.target)])
                    else:
                        assert then.target is None and not parse_grounding(then.answer).boxes
                else:
                    assert lead.kind == "refer" and lead.target is not None
                    obj = scene.objects[lead.target]
                    if then.form == "it_size":
                        assert then.answer == (obj.size if lang == "en" else {"big": "大", "small": "小"}[obj.size])
                    else:
                        worn = scene.objects[obj.wearing].cls if obj.wearing is not None else None
                        expected = (worn.name if lang == "en" else worn.zh) if worn else ("nothing" if lang == "en"
                                                                                          else "没有")
                        assert then.answer == expected
    assert forms == {"count_again", "where_it", "it_wearing", "it_size"}


def test_held_out_phrasings_never_reach_a_training_batch(monkeypatch):
    from multimodal.training import vlm as training

    worded, perturbed = [], []

    def recording(task, rng, split):
        worded.append(rephrase(task, rng, split))
        return worded[-1]

    def recording_perturbed(form, lang, slots, rng):
        perturbed.append((form, lang, perturbed_phrase(form, lang, slots, rng), slots))
        return perturbed[-1][2]

    monkeypatch.setattr(training, "rephrase", recording)
    monkeypatch.setattr(training, "perturbed_phrase", recording_perturbed)
    rng = random.Random(0)
    scenes = [make_scene(seed) for seed in split_seeds("train", 24)]
    asked = set()
    for step in range(200):
        kind = training.sample_kind(rng)
        for scene in scenes[step % 20: step % 20 + 4]:
            task, history = training.sample_conversation(scene, kind, rng)
            asked |= {task.prompt} | {question for question, _ in history}
    # every question of a row was worded by the training path: a training phrasing, or one edited once
    assert {task.prompt for task in worded} | {prompt for _, _, prompt, _ in perturbed} == asked
    assert {task.split for task in worded} == {"train"} and len(asked) > 300
    assert 0.4 < len(perturbed) / (len(perturbed) + len(worded)) < 0.6  # PERTURBED_SHARE
    for form, lang, prompt, slots in perturbed:
        assert prompt not in {template.format(**slots) for template in PHRASINGS[form][lang].held_out}
    # The training path itself refuses a held-out wording, as TrainScenes refuses a test seed.
    monkeypatch.setattr(training, "rephrase", lambda task, rng, split: rephrase(task, rng, "held-out"))
    with pytest.raises(AssertionError, match="held-out phrasing"):
        for _ in range(50):  # (a row the rng sends down the edited path is worded by `perturbed_phrase`)
            training.sample_task(scenes[0], "refer", rng)
    # ... and an edited wording that is a held-out sentence.
    monkeypatch.setattr(training, "rephrase", rephrase)
    monkeypatch.setattr(training, "perturbed_phrase", lambda form, lang, slots, rng: phrase(form, lang, slots, rng,
                                                                                           "held-out"))
    with pytest.raises(AssertionError, match="is held out"):
        for _ in range(50):
            training.sample_task(scenes[0], "refer", rng)


def pieces_distance(a: list[str], b: list[str]) -> int:
    """Levenshtein distance over pieces, the slow obvious way."""
    rows = [list(range(len(b) + 1))]
    for i, piece in enumerate(a, 1):
        row = [i]
        for j, other in enumerate(b, 1):
            row.append(min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (piece != other)))
        rows.append(row)
    return rows[-1][-1]


def test_a_perturbed_wording_is_one_edit_from_a_training_phrasing_and_keeps_its_slots():
    rng = random.Random(7)
    edits = set()
    for form, languages in PHRASINGS.items():
        for lang, phrasings in languages.items():
            for _ in range(40):
                template = rng.choice(phrasings.train)
                edited = perturb(template, lang, rng)
                assert edited != template
                assert sorted(slots_of(edited)) == sorted(slots_of(template))
                prefixes, suffixes = WRAPPERS[lang]
                unwrapped = [edited[len(p):] for p in prefixes if edited.startswith(p)]
                unwrapped += [edited[:-len(s)] for s in suffixes if edited.endswith(s)]
                if any(u.lower() == template.lower() for u in unwrapped):
                    edits.add("wrap")
                    continue
                # the same punctuation, and one word or character more, fewer or other
                assert [c for c in edited if not c.isalnum()] == [c for c in template if not c.isalnum()] or \
                    lang == "en"  # an English word inserted brings its space
                if lang == "en":
                    assert pieces_distance(_pieces(edited.lower(), lang), _pieces(template.lower(), lang)) <= 2
                else:  # one run of one to three characters in the place of at most one
                    removed, added = changed_runs(_pieces(template, lang), _pieces(edited, lang))
                    assert len(removed) <= 1 and len(added) <= 3 and removed + added, (template, edited)
                edits.add("other")
    assert edits == {"wrap", "other"}


def changed_runs(before: list[str], after: list[str]) -> tuple[list[str], list[str]]:
    """The pieces of `before` and of `after` left once their common start and end are taken away."""
    start = 0
    while start < min(len(before), len(after)) and before[start] == after[start]:
        start += 1
    end = 0
    while end < min(len(before), len(after)) - start and before[-1 - end] == after[-1 - end]:
        end += 1
    return before[start:len(before) - end], after[start:len(after) - end]


def test_a_splice_joins_the_head_of_one_phrasing_to_the_tail_of_another_at_a_shared_slot():
    rng = random.Random(3)
    assert splice("Where {be} {thing}?", "Find {thing}.", "en", rng) == "Where {be} {thing}?"  # other slots
    for _ in range(20):
        joined = splice("请找出{thing}。", "{thing}在什么位置？", "zh", rng)
        assert joined == "请找出{thing}在什么位置？"
        assert splice("Find {thing}.", "Please locate {thing} in the image.", "en", rng) == \
            "Find {thing} in the image."
    for _ in range(40):  # no slots: any word boundary of each, the first's start and the second's end kept
        first, second = rng.sample(PHRASINGS["caption"]["zh"].train, 2)
        joined = splice(first, second, "zh", rng)
        assert joined[0] == first[0] and joined[-1] == second[-1] and joined not in (first, second)


def test_edited_wordings_reach_several_edits_from_any_training_phrasing_and_keep_their_slots():
    rng = random.Random(5)
    slots = {"thing": "出租车"}
    trained = [template.format(**slots) for template in PHRASINGS["refer"]["zh"].train]
    prompts = [perturbed_phrase("refer", "zh", slots, rng) for _ in range(300)]
    assert all("出租车" in prompt for prompt in prompts)
    nearest = [min(pieces_distance(list(prompt), list(sentence)) for sentence in trained) for prompt in prompts]
    assert 0.25 < sum(distance >= 2 for distance in nearest) / len(nearest) < 0.9
    assert max(nearest) >= 4


def test_a_perturbed_phrase_is_never_a_held_out_sentence(monkeypatch):
    import multimodal.phrasing as phrasing

    slots = {"thing": "the dog", "be": "is"}
    held_out = PHRASINGS["refer"]["en"].held_out[0]
    proposals = iter([held_out, held_out, PHRASINGS["refer"]["en"].train[3]])
    monkeypatch.setattr(phrasing, "perturb", lambda template, lang, rng: next(proposals))
    monkeypatch.setattr(phrasing, "EDIT_COUNTS", ((1, 1.0),))
    monkeypatch.setattr(phrasing, "SPLICE_SHARE", 0.0)
    assert phrasing.perturbed_phrase("refer", "en", slots, random.Random(0)) == "Can you locate the dog?"
    assert phrasing.is_held_out("refer", "en", held_out.format(**slots), slots)
    assert not phrasing.is_held_out("refer", "en", "Can you locate the dog?", slots)


def test_eval_items_alternate_language_and_phrasing_split():
    from multimodal.evaluation import eval_tasks

    for kind in ("refer", "absent", "vqa", "caption"):
        items = eval_tasks(kind, 16)
        assert [t.lang for _, t in items] == ["en", "zh"] * 8
        assert [t.split for _, t in items] == ["train", "train", "held-out", "held-out"] * 4
        assert all((t.target is None) == (kind == "absent") for _, t in items if t.kind == "refer")
        canonical = eval_tasks(kind, 16, wording="canonical")
        assert [s.seed for s, _ in canonical] == [s.seed for s, _ in items]
        assert all(t.prompt == PHRASINGS[t.form][t.lang].train[0].format(**dict(t.slots)) for _, t in canonical)
    with pytest.raises(ValueError, match="Unknown wording"):
        eval_tasks("vqa", 4, wording="fancy")
    validation = eval_tasks("refer", 8, split="val")
    assert all(split_of(scene.seed) == "val" for scene, _ in validation)
    assert all(split_of(scene.seed) == "test" for scene, _ in eval_tasks("refer", 8))
    with pytest.raises(ValueError, match="test or val split"):
        eval_tasks("vqa", 4, split="train")


def test_absent_measure_counts_absence_without_a_box_and_nothing_else():
    from multimodal.evaluation import eval_tasks, evaluate_understanding

    items = eval_tasks("absent", 8)
    replies = [absent_answer("cat", "en"), "图中没有狗。", "There is no dog [[010,020,300,400]]", "[[010,020,300,400]]",
               "a dog", "没有", "There are no glasses in the image.", "有"]
    result = evaluate_understanding("absent", lambda images, questions, limit: replies, 8)
    expected = [1, 1, 0, 0, 0, 1, 1, 0]
    assert result.value == sum(expected) / 8
    trained = [score for score, (_, task) in zip(expected, items) if task.split == "train"]
    assert result.details["train phrasings (4)"] == sum(trained) / 4
    assert result.details["zh (4)"] == sum(expected[1::2]) / 4


def test_chat_eval_scores_follow_ups_that_refer_back_after_the_models_own_answer():
    from multimodal.evaluation import back_reference, eval_tasks, evaluate_follow_ups

    items = eval_tasks("vqa", 12)
    pairs = {(lead.prompt, then.prompt): then.answer for lead, then in (back_reference(s, t) for s, t in items)}

    def remembering(images, conversations, max_new_tokens):
        return [pairs.get((turns[0][1], turns[-1][1]), "1") for turns in conversations]

    result = evaluate_follow_ups(remembering, 12, batch_size=5)
    assert result.details["referring back Acc"] == 1.0
    forgetting = evaluate_follow_ups(lambda images, conversations, limit: ["1"] * len(conversations), 12)
    expected = sum(answer == "1" for answer in pairs.values()) / 12
    assert forgetting.details["referring back Acc"] == pytest.approx(expected) and expected < 1.0


@pytest.mark.parametrize("reply,lang,expected", [
    ("There is no cat in the image.", "en", True), ("There is no cat in the image.", "zh", False),
    ("图中没有猫。", "zh", True), ("图中没有猫。", "en", False), ("a dog 一只狗", "en", False), ("3", "en", None),
    ("[[010,020,300,400]]", "zh", None), ("绿色", "zh", True), ("green", "zh", False),
])
def test_the_reply_language_is_told_apart(reply, lang, expected):
    from multimodal.evaluation import in_language

    assert in_language(reply, lang) is expected


def test_understanding_reports_the_share_of_replies_in_the_questions_language():
    from multimodal.evaluation import eval_tasks, evaluate_understanding

    items = eval_tasks("absent", 4)  # en, zh, en, zh
    replies = ["There is no cat in the image.", "There is no cat in the image.", "2", "图中没有猫。"]
    result = evaluate_understanding("absent", lambda images, questions, limit: replies, 4)
    assert [t.lang for _, t in items] == ["en", "zh", "en", "zh"]
    assert result.details["in the question's language (3)"] == 2 / 3
