"""The VLM's two-stage training: the text encoder's weights stay exactly those of the language stage, the rest
learns, and the diffusion export ships the run's moving average and refuses a VLM whose text encoder differs; the
auxiliary vision losses."""

from __future__ import annotations

import random

import pytest
import torch

from diffusion.text_encoder import GLMTextEncoder
from multimodal.assets import load_world_tokenizer
from multimodal.checkpoint import read_native_config
from multimodal.language import scene_tasks
from multimodal.training.data import drawn_look
from multimodal.training.loop import TrainScenes
from multimodal.training.vlm import (
    GROWN_LAYERS,
    MIN_SPREAD,
    RECIPE,
    PatchDetectionHead,
    answer_rows,
    drawn_look_seed,
    grow,
    is_text_encoder_parameter,
    lookup_attention,
    lookup_cells,
    lookup_loss,
    patch_targets,
    query_loss,
    question_class,
    spread_loss,
    text_encoder_fingerprint,
    train_vlm,
    world_vlm_config,
)
from multimodal.world import CLASSES, DRAWING, make_scene, split_seeds
from vlm.convert import load_vlm
from vlm.model import VisionLanguageModel
from vlm.processor import Processor

VLM_LOOP = RECIPE.settings("fast", batch_size=2)


def test_vision_stage_keeps_the_text_encoder_and_trains_the_rest(tmp_path):
    torch.set_num_threads(1)
    tokenizer = load_world_tokenizer()
    train_vlm(tmp_path, tokenizer, steps=2, language_steps=2, tower_steps=2, settings=VLM_LOOP, scenes=6)
    language = load_vlm(tmp_path / "language" / "model")
    vision = load_vlm(tmp_path / "model")
    assert text_encoder_fingerprint(language) == text_encoder_fingerprint(vision)
    layers = language.config.num_layers
    assert vision.config.num_layers == layers + GROWN_LAYERS and vision.config.encoder_layers == layers - 1
    before, after = language.state_dict(), vision.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    frozen = {name for name in after if is_text_encoder_parameter(name, layers - 1)}
    assert frozen and not changed & frozen
    assert "vision.patch_embed.convs.0.weight" in changed and f"layers.{layers - 1}.attn.qkv.weight" in changed
    assert f"layers.{layers - 2}.attn.vision_qkv.weight" in changed
    assert after[f"layers.{layers}.attn.dense.weight"].abs().sum() > 0  # a grown layer's zero projection learned


def test_grown_layers_start_as_the_identity(generator):
    config = world_vlm_config(300)
    model = VisionLanguageModel(config).init_weights(generator=generator)
    grown, grown_config = grow(model, config, 2)
    assert grown_config.text.num_layers == config.text.num_layers + 2 and grown_config.text.encoder_layers == 3
    ids = torch.randint(0, 300, (2, 9), generator=generator)
    pixels = torch.randn(2, 3, 64, 64, generator=generator)
    positions = torch.arange(9 + config.image_tokens).expand(2, -1)
    ids_with_image = torch.cat([ids[:, :2], torch.zeros(2, config.image_tokens, dtype=torch.long), ids[:, 2:]], 1)
    with torch.no_grad():
        expected = model(ids_with_image, image_embeds=model.encode_image(pixels), image_start=2, positions=positions)
        actual = grown(ids_with_image, image_embeds=grown.encode_image(pixels), image_start=2, positions=positions)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        text_states = [GLMTextEncoder(m, lambda t: [3 + ord(c) % 200 for c in t], pad_id=0)(["a dog"])[0]
                       for m in (model, grown)]
    torch.testing.assert_close(text_states[1], text_states[0], rtol=0, atol=0)


def test_patch_targets_mark_the_patch_holding_each_box_centre():
    scenes = [make_scene(seed) for seed in split_seeds("train", 12)]
    grid = 8
    classes, boxes = patch_targets(scenes, grid)
    names = list(CLASSES)
    for row, scene in enumerate(scenes):
        expected = {}
        for index, obj in enumerate(scene.objects):  # the slow way: the centre in pixels, the patch it falls in
            x0, y0, x1, y1 = obj.box
            col, line = int((x0 + x1) / 2 / scene.size * grid), int((y0 + y1) / 2 / scene.size * grid)
            cell = line * grid + col
            area = (x1 - x0) * (y1 - y0)
            if cell not in expected or area > expected[cell][0]:
                expected[cell] = (area, index)
        assert set(classes[row].nonzero().flatten().tolist()) == set(expected)
        for cell, (_, index) in expected.items():
            assert classes[row, cell] == 1 + names.index(scene.objects[index].name)
            x0, y0, x1, y1 = scene.objects[index].box
            torch.testing.assert_close(boxes[row, cell], torch.tensor([x0, y0, x1, y1]) / scene.size, atol=2e-3, rtol=0)


def test_spread_loss_is_zero_for_varied_images_and_positive_for_a_constant_prefix(generator):
    varied = torch.randn(64, 3, 16, generator=generator)  # [B, n, H]: every dimension varies across images
    assert spread_loss(varied).item() < 0.05
    constant = torch.randn(1, 3, 16, generator=generator) * 10 + 0.1 * varied  # a prefix with the image 1% of it
    normalized = constant / constant.pow(2).mean(-1, keepdim=True).sqrt()
    expected = (MIN_SPREAD - normalized.std(0)).clamp(min=0).mean()
    torch.testing.assert_close(spread_loss(constant), expected, rtol=1e-4, atol=1e-6)
    assert spread_loss(constant).item() > 0.5


def test_the_detection_heads_live_in_the_trainer_state_not_the_model(tmp_path):
    torch.set_num_threads(1)
    tokenizer = load_world_tokenizer()
    train_vlm(tmp_path, tokenizer, steps=1, language_steps=1, tower_steps=1, settings=VLM_LOOP, scenes=4)
    model = load_vlm(tmp_path / "model")
    tower = PatchDetectionHead(model.vision.width)
    tower.load_state_dict(torch.load(tmp_path / "tower" / "trainer.pt", weights_only=True)["extra"])  # strict
    heads = torch.nn.ModuleDict({"tower": tower, "tokens": PatchDetectionHead(model.config.hidden_size),
                                 "query": torch.nn.Linear(model.config.hidden_size, len(CLASSES))})
    heads.load_state_dict(torch.load(tmp_path / "trainer.pt", weights_only=True)["extra"])
    assert not any(".classes." in name or name.startswith("classes") for name in model.state_dict())


def test_diffusion_run_exports_its_moving_average_and_refuses_another_text_encoder(tmp_path):
    import shutil

    import pytest

    from diffusion.pipeline import load_relay_pipeline
    from multimodal.checkpoint import NATIVE_WEIGHTS, read_state_dict
    from multimodal.training import diffusion, judge
    from multimodal.training.export import export_suite

    torch.set_num_threads(1)
    tokenizer = load_world_tokenizer()
    runs = tmp_path / "runs"
    train_vlm(runs / "vlm", tokenizer, steps=1, language_steps=1, tower_steps=1, settings=VLM_LOOP, scenes=4)
    diffusion.train_diffusion(runs / "diffusion", tokenizer, runs / "vlm", steps=3, scenes=4,
                              settings=diffusion.RECIPE.settings("fast", batch_size=2))
    judge.train_judge(runs / "judge", tokenizer, steps=1, scenes=4,
                      settings=judge.RECIPE.settings("fast", batch_size=2))
    tokenizer_file = tokenizer.save(tmp_path / "tokenizer.json")

    suite = export_suite(runs, tokenizer_file, tmp_path / "suite")
    pipeline = load_relay_pipeline(suite / "diffusion")
    averaged = read_state_dict(runs / "diffusion" / "ema" / NATIVE_WEIGHTS)
    last = read_state_dict(runs / "diffusion" / "model" / NATIVE_WEIGHTS)
    name = "proj_out.weight"
    torch.testing.assert_close(pipeline.base.state_dict()[name], averaged[f"base.{name}"], rtol=0, atol=0)
    assert not torch.equal(averaged[f"base.{name}"], last[f"base.{name}"])
    image = pipeline("a dog with a hat", seed=0, num_inference_steps=2, relay_steps=2).images[0]
    assert image.size == (64, 64)

    # A run continued from the suite's pipeline starts from its denoisers and text whitening (at a learning rate of
    # 1e-12 one step leaves them where they were).
    still = diffusion.RECIPE.settings("fast", batch_size=2, lr=1e-12)
    diffusion.train_diffusion(tmp_path / "continued", tokenizer, runs / "vlm", steps=1, scenes=4, settings=still,
                              init=suite / "diffusion")
    continued = read_state_dict(tmp_path / "continued" / "model" / NATIVE_WEIGHTS)
    for stage, model in (("base", pipeline.base), ("relay", pipeline.relay)):
        for key, value in model.state_dict().items():
            torch.testing.assert_close(continued[f"{stage}.{key}"], value, rtol=0, atol=1e-6)
    assert "base.text_whitening" in continued

    # A VLM trained further replaces the suite's alone; one from another seed has another text encoder.
    more = tmp_path / "more"
    train_vlm(more / "vlm", tokenizer, steps=2, settings=VLM_LOOP, scenes=4, init=runs / "vlm" / "model")
    export_suite(more, tokenizer_file, suite)
    torch.testing.assert_close(read_state_dict(suite / "vlm" / NATIVE_WEIGHTS)["layers.4.attn.qkv.weight"],
                               read_state_dict(more / "vlm" / "model" / NATIVE_WEIGHTS)["layers.4.attn.qkv.weight"])
    assert load_relay_pipeline(suite / "diffusion").base is not None

    # The VLM's run keeps the tokenizer it was trained on and the suite's VLM reads with it; the painter keeps the
    # one its pipeline records (the suite's), however the VLM's cuts Chinese text.
    from multimodal.engine import Engine, EngineError
    from multimodal.training.tokenizer import with_name_pieces

    assert (more / "vlm" / "model" / "tokenizer.json").read_text() == tokenizer_file.read_text()
    with_name_pieces(tokenizer_file, more / "vlm" / "model" / "tokenizer.json")
    export_suite(more, tokenizer_file, suite)
    engine = Engine.load(suite)
    question = "出租车在哪里？"
    chat_pieces = [engine.chat_model.tokenizer.decode([i]) for i in engine.chat_model.tokenizer.encode(question)]
    assert chat_pieces == ["出租车", "在哪里", "？"]
    painted = engine.painter.text_encoder.tokenize(question)
    assert painted == list(tokenizer.prefix()) + tokenizer.encode(question)
    assert tokenizer.encode(question) != engine.chat_model.tokenizer.encode(question)
    saved = Engine.load(engine.save(tmp_path / "saved"))  # a saved engine keeps both
    assert saved.painter.text_encoder.tokenize(question) == painted
    assert saved.chat_model.tokenizer.encode(question) == engine.chat_model.tokenizer.encode(question)
    (tmp_path / "saved" / "tokenizer.json").unlink()
    with pytest.raises(EngineError, match="reads prompts with ../tokenizer.json, which is missing"):
        Engine.load(tmp_path / "saved")
    (more / "vlm" / "model" / "tokenizer.json").unlink()
    export_suite(more, tokenizer_file, suite)  # a VLM trained on the suite's tokenizer leaves no other behind
    assert not (suite / "vlm" / "tokenizer.json").exists()
    assert Engine.load(suite).chat_model.tokenizer.encode(question) == tokenizer.encode(question)

    other = tmp_path / "other"
    train_vlm(other / "vlm", tokenizer, seed=1, steps=1, language_steps=1, tower_steps=1, settings=VLM_LOOP, scenes=4)
    with pytest.raises(ValueError, match="another text encoder"):
        export_suite(other, tokenizer_file, suite)
    with pytest.raises(ValueError, match="another text encoder"):
        diffusion.train_diffusion(tmp_path / "wrong", tokenizer, other / "vlm", steps=1, scenes=4, settings=still,
                                  init=suite / "diffusion")
    with pytest.raises(FileNotFoundError, match="the diffusion and judge part"):
        export_suite(more, tokenizer_file, tmp_path / "empty")
    shutil.rmtree(runs / "vlm")
    shutil.copytree(other / "vlm", runs / "vlm")
    with pytest.raises(ValueError, match="another text encoder"):  # against the diffusion run, not a suite
        export_suite(runs, tokenizer_file, tmp_path / "suite2")


def _grown_world_vlm(tokenizer, generator):
    config = world_vlm_config(tokenizer.vocab_size)
    model, _ = grow(VisionLanguageModel(config).init_weights(generator=generator), config, GROWN_LAYERS)
    with torch.no_grad():  # the grown layers' zero projections would hide a wrong attention from the output check
        for param in model.layers[-GROWN_LAYERS:].parameters():
            param.normal_(0, 0.05, generator=generator)
    return model.eval()


def _refer_batch(model, tokenizer, generator):
    """Two refer tasks of different lengths (so one row is padded) on random images."""
    from multimodal.language import scene_tasks

    scenes = [make_scene(seed) for seed in split_seeds("train", 30)]
    picked = [(s, t) for s in scenes for t in scene_tasks(s) if t.kind == "refer" and t.target is not None]
    tokens = len(tokenizer.encode(picked[0][1].prompt))
    picked = [picked[0], next(p for p in picked if len(tokenizer.encode(p[1].prompt)) != tokens)]
    processor = Processor(tokenizer, model.vlm_config, pad_id=tokenizer.pad_id)
    rows, lengths = answer_rows(processor, tokenizer, [t for _, t in picked], with_image=True)
    pixels = torch.randn(len(rows), 3, 64, 64, generator=generator)
    inputs = processor.layout(rows, model.vlm_config.image_tokens, pixels)
    assert inputs.padded
    return picked, inputs, lengths


def test_lookup_attention_is_the_attention_the_layer_computes(generator, monkeypatch):
    import vlm.model

    tokenizer = load_world_tokenizer()
    model = _grown_world_vlm(tokenizer, generator)
    _, inputs, _ = _refer_batch(model, tokenizer, generator)
    layer_index = model.config.num_layers - GROWN_LAYERS
    calls, outputs = [], {}
    real_attention = vlm.model.attention

    def recording(q, k, v, *args, **kwargs):  # keeps the value rows and the output of the lookup layer's attention
        out = real_attention(q, k, v, *args, **kwargs)
        if len(calls) == layer_index:
            outputs.update(v=v, out=out)
        calls.append(1)
        return out

    monkeypatch.setattr(vlm.model, "attention", recording)
    with torch.no_grad():
        _, hidden = model(inputs.input_ids, image_embeds=model.encode_image(inputs.pixels),
                          image_start=inputs.image_start, positions=inputs.positions,
                          attention_mask=inputs.attention_mask, output_hidden_states=True)
        probs = lookup_attention(model, hidden[layer_index], inputs)  # [B, h, T, T]
    heads, head_dim = probs.shape[1], model.config.head_dim
    expected = outputs["out"][..., : heads * head_dim].unflatten(-1, (heads, head_dim)).transpose(1, 2)  # [B,h,T,D]
    torch.testing.assert_close(probs @ outputs["v"][:, :1], expected, rtol=1e-4, atol=1e-5)
    real = inputs.attention_mask
    padding_keys = (real[:, None, :, None] & ~real[:, None, None, :]).expand_as(probs)  # real queries, padded keys
    assert padding_keys.any() and torch.all(probs[padding_keys] == 0)


def test_lookup_loss_is_the_attention_on_the_target_cell_at_answer_positions(generator):
    tokenizer = load_world_tokenizer()
    model = _grown_world_vlm(tokenizer, generator)
    picked, inputs, lengths = _refer_batch(model, tokenizer, generator)
    cells = [lookup_cells(scene, task, 4) for scene, task in picked]
    cells[1] = cells[1] + [(cells[1][0] + 5) % 16]  # two cells: their attention is summed
    layer_input = torch.randn(*inputs.input_ids.shape, model.config.hidden_size, generator=generator,
                              requires_grad=True)
    loss = lookup_loss(model, layer_input, inputs, lengths, cells)
    probs = lookup_attention(model, layer_input, inputs).detach()
    total, count = 0.0, 0
    length = inputs.input_ids.shape[1]
    for row in range(len(lengths)):  # the slow way: every head, every position that predicts an answer token
        for head in range(probs.shape[1]):
            for position in range(length - lengths[row] - 1, length - 1):
                on_cells = sum(probs[row, head, position, inputs.image_start + 1 + cell] for cell in cells[row])
                total += -torch.log(on_cells + 1e-6)
                count += 1
    torch.testing.assert_close(loss.detach(), total / count, rtol=1e-5, atol=1e-6)  # rows have equal answer lengths
    loss.backward()
    layer = model.layers[model.config.num_layers - GROWN_LAYERS]
    assert layer.attn.qkv.weight.grad.abs().sum() > 0 and layer.attn.vision_qkv.weight.grad.abs().sum() > 0


def test_lookup_cells_are_the_cells_of_what_the_question_names():
    from multimodal.language import Task, scene_tasks

    scene = next(s for s in map(make_scene, split_seeds("train", 200)) if len({o.name for o in s.objects}) == 4
                 and len(s.objects) == 4)
    for index, obj in enumerate(scene.objects):
        x0, y0, x1, y1 = obj.box  # the slow way: the centre in pixels, the cell of a 4x4 grid it falls in
        cell = int((y0 + y1) / 2 / scene.size * 4) * 4 + int((x0 + x1) / 2 / scene.size * 4)
        refer = next(t for t in scene_tasks(scene) if t.kind == "refer" and t.target == index)
        assert lookup_cells(scene, refer, 4) == [cell]
        for lang, question in (("en", f"How many {obj.cls.plural} are there?"), ("zh", f"{obj.cls.zh}是大还是小？")):
            assert lookup_cells(scene, Task("vqa", lang, question, ""), 4) == [cell]
    absent = next(c for c in CLASSES.values() if scene.count(c.name) == 0)
    assert lookup_cells(scene, Task("vqa", "en", f"Is there {absent.with_article()}?", "no"), 4) == []
    missing = next(t for t in scene_tasks(scene) if t.kind == "refer" and t.target is None)
    assert lookup_cells(scene, missing, 4) == []
    assert lookup_cells(scene, Task("vqa", "en", "What colour is the background?", "red"), 4) == []
    assert lookup_cells(scene, Task("caption", "en", "Describe the image.", ""), 4) == []
    repeated = next(s for s in map(make_scene, split_seeds("train", 400)) if any(s.count(o.name) == 2
                                                                                 for o in s.objects))
    name = next(o.name for o in repeated.objects if repeated.count(o.name) == 2)
    cells = lookup_cells(repeated, Task("vqa", "en", f"How many {CLASSES[name].plural} are there?", "2"), 4)
    assert 1 <= len(cells) <= 2 and all(0 <= c < 16 for c in cells)


def test_query_loss_reads_the_class_asked_about_at_the_first_answer_prediction(generator):
    from multimodal.language import Task

    scene = next(s for s in map(make_scene, split_seeds("train", 50)) if len(s.entities) >= 2)
    present = scene.objects[0].cls
    absent = next(c for c in CLASSES.values() if scene.count(c.name) == 0)
    tasks = [Task("vqa", "en", f"How many {present.plural} are there?", "1"),
             Task("vqa", "zh", f"图中有{absent.zh}吗？", "没有"),
             Task("vqa", "en", "What colour is the background?", "red"),
             next(t for t in scene_tasks(scene) if t.kind == "refer")]
    names = [question_class(scene, task) for task in tasks]
    assert names == [present.name, absent.name, None, scene.objects[tasks[3].target].name]
    missing = next(t for t in scene_tasks(scene) if t.kind == "refer" and t.target is None)
    assert question_class(scene, missing) in CLASSES and scene.count(question_class(scene, missing)) == 0
    classifier = torch.nn.Linear(8, len(CLASSES))
    states = torch.randn(4, 12, 8, generator=generator)  # [B, T, C]
    lengths = [3, 5, 2, 4]
    loss = query_loss(classifier, states, lengths, names)
    expected = [torch.nn.functional.cross_entropy(classifier(states[row, 12 - lengths[row] - 1])[None],
                                                  torch.tensor([list(CLASSES).index(names[row])]))
                for row in (0, 1, 3)]  # the slow way, row by row; the background question does not count
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    assert query_loss(classifier, states, lengths, [None] * 4) is None


def test_a_vision_stage_can_start_from_a_finished_vlm(tmp_path):
    torch.set_num_threads(1)
    tokenizer = load_world_tokenizer()
    train_vlm(tmp_path / "first", tokenizer, steps=1, language_steps=1, tower_steps=1, settings=VLM_LOOP, scenes=4)
    first = load_vlm(tmp_path / "first" / "model")
    train_vlm(tmp_path / "more", tokenizer, steps=2, settings=VLM_LOOP, scenes=4, init=tmp_path / "first" / "model",
              drawing_share=1.0)
    more = load_vlm(tmp_path / "more" / "model")
    assert read_native_config(tmp_path / "more" / "model", "vlm")["drawing_share"] == 1.0
    assert not (tmp_path / "more" / "language").exists() and not (tmp_path / "more" / "tower").exists()
    assert text_encoder_fingerprint(more) == text_encoder_fingerprint(first)
    assert more.vlm_config == first.vlm_config
    before, after = first.state_dict(), more.state_dict()
    assert not torch.equal(before["layers.4.attn.qkv.weight"], after["layers.4.attn.qkv.weight"])
    with pytest.raises(ValueError, match="fraction from 0 to 1"):
        train_vlm(tmp_path / "bad", tokenizer, steps=1, settings=VLM_LOOP, scenes=4, init=tmp_path / "first" / "model",
                  drawing_share=1.5)
    with pytest.raises(ValueError, match="not a grown world VLM"):
        train_vlm(tmp_path / "bad", tokenizer, steps=1, settings=VLM_LOOP, scenes=4,
                  init=tmp_path / "first" / "language" / "model")


def test_follow_up_rows_hold_the_image_once_then_the_earlier_turns_then_the_answer(monkeypatch):
    import random

    import multimodal.training.vlm as training
    from multimodal.phrasing import PHRASINGS
    from multimodal.training.vlm import earlier_turns

    monkeypatch.setattr(training, "PERTURBED_SHARE", 0.0)  # every earlier turn in a training phrasing as it stands

    tokenizer = load_world_tokenizer()
    config = world_vlm_config(tokenizer.vocab_size)
    processor = Processor(tokenizer, config, pad_id=tokenizer.pad_id)
    scene = make_scene(split_seeds("train", 1)[0])
    task = next(t for t in scene_tasks(scene) if t.kind == "vqa" and t.lang == "zh")
    history = earlier_turns(scene, task, random.Random(3))
    assert 1 <= len(history) <= 3 and all(question != task.prompt for question, _ in history)
    trained = {(p.format(**dict(t.slots)), t.answer) for t in scene_tasks(scene) if t.form
               for p in PHRASINGS[t.form][t.lang].train}  # each scene task in each training phrasing
    assert all(turn in trained for turn in history)
    (before, after), = answer_rows(processor, tokenizer, [task], with_image=True, histories=[history])[0]
    lengths = answer_rows(processor, tokenizer, [task], with_image=True, histories=[history])[1]
    expected_after = []
    for index, (question, answer) in enumerate(history):
        if index:
            expected_after += [tokenizer.token_id("<|user|>")] + tokenizer.encode("\n")
        expected_after += tokenizer.encode(question) + [tokenizer.token_id("<|assistant|>")]
        expected_after += tokenizer.encode("\n") + tokenizer.encode(answer)
    expected_after += [tokenizer.token_id("<|user|>")] + tokenizer.encode("\n") + tokenizer.encode(task.prompt)
    expected_after += [tokenizer.token_id("<|assistant|>")] + tokenizer.encode("\n")
    answer_ids = tokenizer.encode(task.answer) + [tokenizer.token_id("<|user|>")]
    assert after == expected_after + answer_ids and lengths == [len(answer_ids)]
    assert before.count(tokenizer.token_id("<|user|>")) == 1  # the image sits in the first user turn only
    inputs = processor.layout([(before, after)], config.image_tokens, torch.zeros(1, 3, 64, 64))
    assert inputs.image_start == len(before) and inputs.input_ids.shape[1] == len(before) + config.image_tokens + len(
        after)


def test_about_half_of_the_earlier_turns_end_in_a_caption_request_and_a_fifth_are_in_the_other_language():
    import random

    from multimodal.evaluation import in_language
    from multimodal.training.vlm import CAPTION_LEAD_SHARE, MAX_EARLIER_TURNS, SWITCHED_LANGUAGE_SHARE, earlier_turns

    rng = random.Random(5)
    scenes = [make_scene(seed) for seed in split_seeds("train", 12)]
    ends_in_caption, counts, switched = [], [], []
    for index in range(600):
        scene = scenes[index % len(scenes)]
        task = rng.choice([t for t in scene_tasks(scene) if t.kind in ("vqa", "refer")])
        history = earlier_turns(scene, task, rng)
        assert 1 <= len(history) <= MAX_EARLIER_TURNS
        languages = {in_language(question, "zh") for question, _ in history}
        assert len(languages) == 1  # one language for all earlier turns, each answer in its question's
        assert all(in_language(answer, "zh") in (languages | {None}) for _, answer in history)
        history_lang = "zh" if languages == {True} else "en"
        switched.append(history_lang != task.lang)
        captions = {t.answer for t in scene_tasks(scene) if t.kind == "caption" and t.lang == history_lang}
        answers = [answer for _, answer in history]
        ends_in_caption.append(answers[-1] in captions)
        if answers[-1] in captions:
            counts.append(len(history))
            assert not any(answer in captions for answer in answers[:-1])  # one caption, the turn just before
    share = sum(ends_in_caption) / len(ends_in_caption)
    assert CAPTION_LEAD_SHARE - 0.07 < share < CAPTION_LEAD_SHARE + 0.1  # plus the captions drawn among the others
    assert abs(sum(switched) / len(switched) - SWITCHED_LANGUAGE_SHARE) < 0.05
    assert set(counts) == set(range(1, MAX_EARLIER_TURNS + 1))  # alone, or after other turns


def test_the_recipe_trains_exports_and_evaluates_every_embedded_model(tmp_path):
    import json

    from multimodal.assets import asset_path
    from multimodal.training.recipe import RecipeSteps, run_recipe

    torch.set_num_threads(1)
    steps = RecipeSteps().scaled(1e-6)  # one step per stage: the pipeline, not the quality
    assert set(vars(steps).values()) == {1}
    record = run_recipe(tmp_path, asset_path("tokenizer.json"), steps=steps, eval_count=4, draw_count=2, scenes=8)
    assert set(record["seconds"]) == {"vlm", "judge", "diffusion", "export", "eval"}
    assert set(record["measures"]) == {"ground", "absent", "caption", "vqa", "chat", "draw"}
    assert all(0 <= measure["value"] for measure in record["measures"].values())
    assert json.loads((tmp_path / "recipe.json").read_text()) == json.loads(json.dumps(record))
    for part in ("vlm", "diffusion", "judge", "tokenizer.json"):
        assert (tmp_path / "suite" / part).exists()


@pytest.mark.parametrize("groups", [2, 3])
def test_rows_in_groups_of_similar_length_give_the_loss_and_gradients_of_the_whole_batch(generator, groups):
    from multimodal.training.vlm import vision_heads, vision_pool, vision_step_loss

    torch.set_num_threads(1)
    tokenizer = load_world_tokenizer()
    model = _grown_world_vlm(tokenizer, generator).train()
    heads = vision_heads(model.vlm_config, PatchDetectionHead(model.vlm_config.vision.width))
    pool = vision_pool(40, model.vlm_config.vision.image_size, cached=False)
    params = [p for p in model.parameters()] + list(heads.parameters())
    results = []
    for count in (1, groups):
        for param in params:
            param.grad = None
        step = vision_step_loss(model, heads, tokenizer, pool, seed=0, batch_size=8, groups=count)
        losses = [step(index) for index in range(3)]  # float32: the same batches either way
        sum(loss for loss, _ in losses).backward()
        results.append(([parts for _, parts in losses], [p.grad.clone() for p in params if p.grad is not None]))
    (whole_parts, whole_grads), (grouped_parts, grouped_grads) = results
    assert {name for parts in whole_parts for name in parts} >= {"answer", "detection", "spread", "lookup", "query"}
    for whole, grouped in zip(whole_parts, grouped_parts):
        assert whole.keys() == grouped.keys()
        for name in whole:
            assert grouped[name] == pytest.approx(whole[name], rel=1e-5, abs=1e-6), name
    assert len(whole_grads) == len(grouped_grads)
    for whole, grouped in zip(whole_grads, grouped_grads):
        torch.testing.assert_close(grouped, whole, rtol=1e-4, atol=1e-6)


def test_length_groups_cut_sorted_rows_where_padding_is_least():
    from multimodal.training.loop import length_groups

    lengths = [5, 50, 6, 7, 48, 60, 8, 9]
    assert length_groups(lengths, 1) == [list(range(8))]
    assert length_groups(lengths, 2) == [[0, 2, 3, 6, 7], [4, 1, 5]]
    assert length_groups([4, 4, 4], 2) == [[0, 1, 2]]  # nothing to save: one group
    for groups in (2, 3, 4):
        found = length_groups(lengths, groups)
        assert sorted(i for group in found for i in group) == list(range(8)) and len(found) <= groups
        padded = sum(len(group) * max(lengths[i] for i in group) for group in found)
        # the slow obvious way: every way to cut the sorted rows into at most `groups` runs
        import itertools
        ordered = sorted(lengths)
        best = min(sum((end - start) * ordered[end - 1] for start, end in zip((0,) + cuts, cuts + (8,)))
                   for k in range(groups) for cuts in itertools.combinations(range(1, 8), k))
        assert padded == best


def test_rows_are_asked_in_chinese_at_the_chinese_share_and_some_histories_in_the_other_language():
    import random

    from multimodal.training.vlm import CHINESE_SHARE, SWITCHED_LANGUAGE_SHARE, TASK_WEIGHTS, sample_conversation

    rng = random.Random(11)
    scenes = [make_scene(seed) for seed in split_seeds("train", 12)]
    languages, switched = [], []
    for index in range(800):
        task, history = sample_conversation(scenes[index % len(scenes)], list(TASK_WEIGHTS)[index % 4], rng)
        languages.append(task.lang)
        chinese_turns = [any("\u4e00" <= ch <= "\u9fff" for ch in question) for question, _ in history]
        if len(set(chinese_turns)) > 1:  # earlier turns, then the question a back-reference follows up on
            assert chinese_turns[-1] == (task.lang == "zh") and len(set(chinese_turns[:-1])) == 1
            chinese_turns = chinese_turns[:-1]
        if history:
            switched.append(chinese_turns[0] != (task.lang == "zh"))
    share = languages.count("zh") / len(languages)
    assert CHINESE_SHARE - 0.05 < share < CHINESE_SHARE + 0.05
    assert SWITCHED_LANGUAGE_SHARE - 0.08 < sum(switched) / len(switched) < SWITCHED_LANGUAGE_SHARE + 0.05


def test_a_row_that_would_outgrow_the_context_drops_its_oldest_earlier_turns():
    tokenizer = load_world_tokenizer()
    config = world_vlm_config(tokenizer.vocab_size)
    processor = Processor(tokenizer, config, pad_id=tokenizer.pad_id)
    scene = make_scene(split_seeds("train", 1)[0])
    task = next(t for t in scene_tasks(scene) if t.kind == "vqa" and t.lang == "zh")
    caption = next(t for t in scene_tasks(scene) if t.kind == "grounded_caption" and t.lang == "zh")
    history = tuple((f"{caption.prompt}{index}", caption.answer) for index in range(6))  # far past 320 tokens

    def fits(turns) -> bool:
        before, after = processor.prompt_ids(task.prompt, turns)
        answer = tokenizer.encode(task.answer) + [tokenizer.token_id("<|user|>")]
        return len(before) + config.image_tokens + len(after) + len(answer) <= config.text.max_seq_len

    (before, after), = answer_rows(processor, tokenizer, [task], with_image=True, histories=[history])[0]
    kept = [index for index in range(6) if _contains(after, tokenizer.encode(history[index][0]))]
    assert len(before) + config.image_tokens + len(after) <= config.text.max_seq_len
    assert kept and kept == list(range(6 - len(kept), 6))  # the newest turns stay
    assert not fits(history[5 - len(kept):])  # and no more were dropped than needed
    processor.layout([(before, after)], config.image_tokens)  # within the context: no error


def _contains(ids: list, part: list) -> bool:
    return any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def test_the_drawn_look_breaks_up_objects_and_leaves_the_background():
    scene_seed = split_seeds("train", 50)[7]
    clean = TrainScenes(0, 64, DRAWING).pixels(scene_seed)  # [3, 64, 64] uint8
    looked = drawn_look(clean, 5)
    assert looked.shape == clean.shape and looked.dtype == torch.uint8
    assert torch.equal(looked, drawn_look(clean, 5)) and not torch.equal(looked, drawn_look(clean, 6))
    background = clean[:, :1, :1].float()
    on_objects = (clean.float() - background).abs().amax(0) > 0.1 * 255  # [64, 64]
    change = (looked.float() - clean.float()).abs().amax(0)  # [64, 64]
    assert on_objects.float().mean() > 0.1
    # the background keeps its colour up to grain and the channel shift; the objects change far more
    assert change[~on_objects].mean() < 40 and change[on_objects].mean() > 2 * change[~on_objects].mean()


def test_only_drawing_scenes_get_the_drawn_look_at_its_share():
    rng = random.Random(0)
    keys = [(index % 2, seed) for index, seed in enumerate(range(4000))]
    seeds = [drawn_look_seed(key, rng, share=0.5) for key in keys]
    assert all(seed is None for (pool, _), seed in zip(keys, seeds) if pool == 0)
    assert all(drawn_look_seed(seed, rng, share=1.0) is None for seed in range(50))  # a single pool's plain seeds
    drawn = [seed for (pool, _), seed in zip(keys, seeds) if pool == 1]
    assert abs(sum(seed is not None for seed in drawn) / len(drawn) - 0.5) < 0.05
    # every row draws the same randomness whatever its pool, so the rows after it do not depend on it
    first, second = random.Random(1), random.Random(1)
    drawn_look_seed((0, 3), first), drawn_look_seed((1, 3), second)
    assert first.random() == second.random()
