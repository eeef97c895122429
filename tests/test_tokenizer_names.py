"""The world tokenizer never joins a Chinese object name to the words around it (`name_pieces`)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer, pre_tokenizers

from multimodal.assets import asset_path
from multimodal.language import scene_tasks
from multimodal.phrasing import PHRASINGS
from multimodal.training.tokenizer import chinese_names, train_tokenizer, with_name_pieces
from multimodal.world import make_scene, split_seeds

NAMES = re.compile("|".join(map(re.escape, chinese_names())))


def chinese_texts(count: int = 40) -> list[str]:
    """Every Chinese prompt and answer of `count` random train scenes, each prompt in every phrasing of its form."""
    seeds = random.Random(3).sample(list(split_seeds("train", 5000)), count)
    texts = []
    for seed in seeds:
        for task in scene_tasks(make_scene(seed)):
            if task.lang != "zh":
                continue
            texts += [task.answer] if task.answer else []
            phrasings = PHRASINGS[task.form]["zh"] if task.form in PHRASINGS else None
            texts += [p.format(**dict(task.slots)) for p in phrasings.train + phrasings.held_out] if phrasings else [
                task.prompt]
    return texts


def names_cut_across(tokenizer: Tokenizer, text: str) -> list[str]:
    """The names in `text` that some token straddles: it starts before the name's first character and ends inside
    it, or starts inside it and ends after its last."""
    pieces = tokenizer.encode(text).offsets  # [(start, end)] in characters, one per token
    return [m.group() for m in NAMES.finditer(text)
            if any(start < edge < end for start, end in pieces for edge in (m.start(), m.end()))]


def test_the_world_tokenizer_with_the_rule_keeps_every_chinese_name_a_piece_of_its_own(tmp_path):
    tokenizer = Tokenizer.from_file(str(with_name_pieces(asset_path("tokenizer.json"), tmp_path / "ruled.json")))
    texts = chinese_texts()
    assert len(texts) > 1000 and sum(bool(NAMES.search(t)) for t in texts) > 500
    assert [(t, names_cut_across(tokenizer, t)) for t in texts if names_cut_across(tokenizer, t)] == []


def test_without_the_rule_the_world_text_merges_names_into_questions():
    """Why the rule exists: the same vocabulary cut without it joins names to their question ("出租车在哪里")."""
    tokenizer = Tokenizer.from_file(str(asset_path("tokenizer.json")))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert names_cut_across(tokenizer, "出租车在哪里？") == ["出租车"]
    assert sum(bool(names_cut_across(tokenizer, t)) for t in chinese_texts(10)) > 20


def test_the_rule_keeps_the_vocabulary_and_english_and_round_trips(tmp_path):
    plain = Tokenizer.from_file(str(asset_path("tokenizer.json")))
    plain.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    plain.save(str(tmp_path / "plain.json"))
    ruled = Tokenizer.from_file(str(with_name_pieces(tmp_path / "plain.json", tmp_path / "ruled.json")))
    assert ruled.get_vocab() == plain.get_vocab()
    seed = random.Random(11).choice(list(split_seeds("test", 1000)))
    for task in scene_tasks(make_scene(seed)):
        for text in filter(None, (task.prompt, task.answer)):
            assert ruled.decode(ruled.encode(text).ids) == text
            if task.lang == "en":
                assert ruled.encode(text).ids == plain.encode(text).ids
    text = "图中有几只出租车？"
    assert [ruled.decode([i]) for i in ruled.encode(text).ids][1:3] == ["出租车", "？"]


def test_a_tokenizer_trained_with_the_rule_never_learns_a_name_joined_to_its_question():
    tokenizer = train_tokenizer(num_scenes=60, vocab_size=700)
    assert [t for t in chinese_texts(8) if names_cut_across(tokenizer, t)] == []
    assert not any(NAMES.search(token) and not NAMES.fullmatch(token)
                   for token in (tokenizer.decode([i]) for i in range(tokenizer.get_vocab_size())))


def test_the_train_command_gives_a_tokenizer_the_rule_or_says_it_is_missing(tmp_path, capsys):
    from multimodal.cli import main

    out = tmp_path / "vlm" / "tokenizer.json"
    assert main(["train", "tokenizer", "--tokenizer", str(asset_path("tokenizer.json")), "--out", str(out)]) == 0
    ruled = Tokenizer.from_file(str(out))
    assert names_cut_across(ruled, "出租车在哪里？") == [] and ruled.get_vocab() == Tokenizer.from_file(
        str(asset_path("tokenizer.json"))).get_vocab()
    assert main(["train", "tokenizer", "--tokenizer", str(tmp_path / "none.json"), "--out", str(out)]) != 0
    assert "none.json does not exist" in capsys.readouterr().err


def test_the_shipped_vlm_reads_with_the_rule_and_the_painter_without(tmp_path):
    """The VLM's copy is the world tokenizer given the rule; the painter and the judge keep the world tokenizer their
    weights were trained on, as the pipeline records."""
    import json

    shipped = Tokenizer.from_file(str(asset_path("vlm/tokenizer.json")))
    expected = Tokenizer.from_file(str(with_name_pieces(asset_path("tokenizer.json"), tmp_path / "ruled.json")))
    assert shipped.get_vocab() == expected.get_vocab()
    assert all(shipped.encode(t).ids == expected.encode(t).ids for t in chinese_texts(5))
    recorded = json.loads((asset_path("diffusion") / "config.json").read_text())["text_encoder"]["tokenizer"]
    assert (asset_path("diffusion") / recorded).resolve() == asset_path("tokenizer.json").resolve()


@pytest.mark.parametrize("own", [True, False])
def test_a_vlm_continued_from_a_folder_reads_with_its_own_tokenizer(tmp_path, monkeypatch, own):
    import multimodal.training.vlm as recipe
    from multimodal.cli import main

    folder = tmp_path / "vlm"
    folder.mkdir()
    if own:
        with_name_pieces(asset_path("tokenizer.json"), folder / "tokenizer.json")
    seen = []
    monkeypatch.setattr(recipe, "train_vlm", lambda out, tokenizer, **_: seen.append(tokenizer) or Path(out))
    assert main(["train", "vlm", "--init", str(folder), "--out", str(tmp_path / "run"), "--steps", "1"]) == 0
    pieces = [seen[0].decode([i]) for i in seen[0].encode("出租车在哪里？")]
    assert (pieces == ["出租车", "在哪里", "？"]) == own
