"""The embedded models end to end through the engine, on held-out EmojiScenes test scenes.

Skipped in an installation without the embedded models (they are trained by `multimodal train` and shipped in
multimodal/assets/). Each understanding measure runs on a slice of the test split (`multimodal eval` runs the whole
of it) against a floor some points below the value measured in the README, so a regression of the shipped weights
or of any code on their path (processor, routing, decoding, box parsing, quantization) fails here.
"""

from __future__ import annotations

import pytest
import torch

from multimodal.engine import EMBEDDED_DIR, VLM_FOLDER, Engine
from multimodal.evaluation import answer_turns_with, answer_with, evaluate_follow_ups, evaluate_understanding

pytestmark = pytest.mark.skipif(not (EMBEDDED_DIR / VLM_FOLDER / "config.json").exists(),
                                reason="the embedded models are not in this installation")


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.set_num_threads(1)
    return Engine.load()


SLICE = 48  # test items per measure: a few seconds each on one CPU thread
# Questions in mixed wordings (half training phrasings, half held-out; `multimodal eval`'s default). Measured on this
# slice: ground 0.896, absent 0.917, caption 0.907, VQA 0.833, VQA as a follow-up 0.896 (INT8: caption 0.833 on
# half of it, VQA 0.833). The weights before the phrasings were trained scored 0.285, 0.052, 0.265, 0.295 and 0.245
# over 1,000 items; a VLM that ignores the image scores about 0.08, 0.03 and 0.37 on template questions.
FLOORS = {"ground": 0.80, "absent": 0.84, "caption": 0.82, "vqa": 0.75, "chat": 0.80}
DRAW_SLICE, RENDER_SLICE = 32, 200
# Measured: the judge finds every object in 0.985 of the first 200 rendered drawing test scenes and ranks their own
# prompt first in 0.995 of them; the shipped pipeline draws all objects in 0.844 of the first 32 prompts (seeds 0-31)
# with R-precision 0.969 among those 32 prompts. Drawings that ignore their prompt score about 0.01 and 1/32.
DRAW_FLOORS = {"render accuracy": 0.95, "render R-precision": 0.97, "presence": 0.70, "R-precision": 0.84}


@pytest.mark.parametrize("kind", ["ground", "absent", "caption", "vqa"])
def test_understanding_on_a_test_slice_stays_above_its_floor(engine, kind):
    result = evaluate_understanding(kind, answer_with(engine.chat_model), SLICE)
    assert result.value >= FLOORS[kind], result.line()


def test_follow_up_questions_stay_above_their_floor(engine):
    result = evaluate_follow_ups(answer_turns_with(engine.chat_model), SLICE)
    assert result.value >= FLOORS["chat"], result.line()


def test_int8_answers_stay_above_the_floors():
    int8 = Engine.load(quant="int8")
    for kind, count in (("caption", SLICE // 2), ("vqa", SLICE)):
        result = evaluate_understanding(kind, answer_with(int8.chat_model), count)
        assert result.value >= FLOORS[kind] - 0.05, result.line()


def test_int8_layers_take_the_blocked_layout_where_the_cpu_has_vnni_with_the_same_answers(monkeypatch):
    from glm.cpu_linears import BlockedInt8Linear
    from kernels import cpu_gemv
    from multimodal.quantize import Int8WeightOnlyLinear

    if not cpu_gemv.available():
        pytest.skip("no C compiler builds the decode kernels here")
    answers, kinds = {}, {}
    for blocked in (False, True):  # where the CPU lacks AVX512_VNNI the blocked layout runs its portable loop
        monkeypatch.setattr(cpu_gemv, "vnni_blocks_available", lambda lib=None, blocked=blocked: blocked)
        int8 = Engine.load(quant="int8")
        kinds[blocked] = {type(m) for m in int8.chat_model.model.modules()} & {BlockedInt8Linear, Int8WeightOnlyLinear}
        image = int8.scene(2_000_011)
        answers[blocked] = [int8.ground(image, question).text for question in
                            ("Where is the dog?", "Describe the image.", "图中有几个物体？")]
    assert kinds == {False: {Int8WeightOnlyLinear}, True: {BlockedInt8Linear}}
    assert answers[True] == answers[False]  # rounding the activations to int16 per row moves no greedy token


def test_the_loaded_vlm_decodes_through_the_c_step_as_the_eager_path_does(engine):
    from kernels import cpu_gemv

    model = engine.chat_model.model
    if not cpu_gemv.available():
        assert model.cpu_decoder is None
        return
    assert model.cpu_decoder is not None  # attached by Engine.load on the CPU
    image = engine.scene(2_000_003)
    questions = ["Where is the dog?", "Describe the image.", "How many objects are there?", "图中有几个物体？"]
    fast = [engine.ground(image, question).text for question in questions]
    decoder, model.cpu_decoder = model.cpu_decoder, None
    try:
        eager = [engine.ground(image, question).text for question in questions]
    finally:
        model.cpu_decoder = decoder
    assert fast == eager  # float32 in both: the same greedy tokens


@pytest.mark.filterwarnings("ignore:INT4 group size")
def test_int4_keeps_the_layers_that_encode_the_painters_prompts_in_float():
    from glm.cpu_linears import BlockedInt4Linear
    from multimodal.quantize import Int4WeightOnlyLinear

    model = Engine.load(quant="int4").chat_model.model
    encoder = model.config.encoder_layers
    kinds = [type(layer.attn.qkv) for layer in model.layers]
    assert kinds[:encoder] == [torch.nn.Linear] * encoder
    assert set(kinds[encoder:]) in ({Int4WeightOnlyLinear}, {BlockedInt4Linear})  # blocked where the CPU has VNNI


def test_drawing_a_dog_with_a_hat_gives_both_stages(engine):
    drawing = engine.draw("a dog with a hat", seed=0)
    height, width = engine.draw_sizes[0]
    assert drawing.relay[0].size == (width, height)
    assert drawing.base[0].size[0] < width


def test_follow_up_eval_asks_the_same_questions_first_and_after_a_caption():
    from multimodal.evaluation import FOLLOW_UP_GAP, eval_tasks, evaluate_follow_ups

    truth = {task.prompt: task.answer for _, task in eval_tasks("vqa", 12)}
    seen = []

    def forgetful(images, conversations, max_new_tokens):  # right as a first turn, wrong as a follow-up
        seen.extend(len(turns) for turns in conversations)
        return [truth.get(turns[-1][1], "a caption") if len(turns) == 1 else "no" for turns in conversations]

    result = evaluate_follow_ups(forgetful, 12, batch_size=5)
    # opener + caption + the question; lead + reply + follow-up
    assert sorted(set(seen)) == [1, 3] and seen.count(3) == 24
    assert result.details["first-turn exact match"] == 1.0 and not result.passed
    assert result.value == pytest.approx(sum(a == "no" for a in truth.values()) / 12)
    steady = evaluate_follow_ups(lambda i, c, m: [truth.get(t[-1][1], "a caption") for t in c], 12)
    assert steady.value == 1.0 and steady.details["gap"] == 0 and steady.passed
    assert steady.bar == pytest.approx(1.0 - FOLLOW_UP_GAP)


@pytest.fixture(scope="module")
def judge():
    from multimodal.assets import asset_path, load_world_tokenizer
    from multimodal.judge import load_judge

    return load_judge(asset_path("judge"), load_world_tokenizer())


def test_the_judge_finds_every_object_in_rendered_drawing_scenes(judge):
    from multimodal.evaluation_draw import draw_items, judge_presence, r_precision, share
    from multimodal.training.loop import scene_image

    items = draw_items(RENDER_SLICE)
    rendered = [scene_image(item.scene, 64) for item in items]
    assert share(judge_presence(judge, rendered, items)) >= DRAW_FLOORS["render accuracy"]
    assert r_precision(judge, rendered, items) >= DRAW_FLOORS["render R-precision"]


def test_drawings_on_a_test_slice_stay_above_their_floors(engine, judge):
    from multimodal.evaluation_draw import draw_items, judge_presence, r_precision, share

    items = draw_items(DRAW_SLICE)
    images = engine.painter([item.task.prompt for item in items], seed=list(range(DRAW_SLICE))).relay
    presence, precision = share(judge_presence(judge, images, items)), r_precision(judge, images, items)
    assert presence >= DRAW_FLOORS["presence"], presence
    assert precision >= DRAW_FLOORS["R-precision"], precision
