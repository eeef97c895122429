"""Training the embedded VLM in CogVLM's stages, on EmojiScenes train scenes.

1. Language: the GLM core alone learns the world's text as chat turns (question -> answer, no image).
2. Tower: the ViT (a conv stem, then the transformer) alone learns the world's objects through a training-only head
   on its patch features: which object is centred in each patch (balanced against the empty patches), that object's
   box, the background colour. CogVLM starts from a pretrained EVA-CLIP; this is ours, and it is quick because no
   language model runs.
3. Vision: the core grows by two layers on top (LLaMA-Pro's block expansion, identity at the start), and the part of
   it that encodes prompts for the diffusion model is frozen (the embeddings and every layer of the language-stage
   core but its last: CogView4 reads GLM's second-to-last hidden states; `text_encoder_layers` keeps pointing the
   encoder there); the ViT, the adapter, the visual experts (initialised as copies of the language expert, as CogVLM
   does), the language-stage core's last layer, the two new layers and the output head learn to answer about the
   image: captions, grounded captions, referring expressions -> `[[x0,y0,x1,y1]]` (or "There is no cat in the
   image.") and VQA, in English and Chinese, on scenes of the default world and a share of the drawing world's
   (`vision_pool`). Questions come in the training phrasings of `multimodal.phrasing` (never a held-out one), alone,
   after earlier turns about the same image, or as follow-ups that refer back to the turn before
   (`sample_conversation`).
   The detection head keeps training beside them, and a second one reads the adapter's image tokens (a 4x4 grid):
   through the answer loss alone a from-scratch tower drifts to near-constant features the language model learns to
   ignore (the same answer for every image). The adapter's output drifts the same way (a constant prefix the language
   model adapts to, the image a few per cent of it), so a spread term asks each dimension of its RMS-normalised patch
   embeddings (what the core's input norm passes on) to vary across the images of a batch. The head is not part of
   the model; its weights live in the trainer state.

Freezing the text-encoder part is what lets the diffusion model use the very same GLM as its frozen text encoder:
those weights are final after stage 1, so the two models can train side by side, and `text_encoder_fingerprint`
proves they agree. Each stage is its own run folder (`<out>/language`, `<out>/tower`, `<out>`) and resumes.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glm.model import GLMConfig, apply_rotary, attention_mask_for
from glm.tokenizer import GLMTokenizer
from multimodal.language import Task, follow_ups, mentioned_classes, rephrase, scene_tasks
from multimodal.phrasing import is_held_out, perturbed_phrase
from multimodal.training.data import drawn_look
from multimodal.training.loop import LoopRecipe, LoopSettings, MixedScenes, Run, TrainScenes, length_groups, train
from multimodal.training.parallel import my_share
from multimodal.world import CLASSES, COLOURS, DRAWING, Scene
from vlm.adapter import AdapterConfig
from vlm.convert import load_vlm
from vlm.model import VisionLanguageModel, VLMConfig, route_experts
from vlm.processor import Processor
from vlm.vit import ViTConfig

KIND = "vlm"
STOP_TOKEN = "<|user|>"  # a reply ends where the next user turn would begin (GLM-4 chat)
TASK_WEIGHTS = {"refer": 0.35, "vqa": 0.35, "caption": 0.15, "grounded_caption": 0.15}
GROWN_LAYERS = 2  # layers added on top of the language-stage core for the vision stage
BOX_LOSS_WEIGHT = 5.0  # box L1 is in units of the image side: 0.05 off is a large miss at this scale
LOOKUP_HEADS = 3  # heads of the first grown layer (one KV group) taught where a referred object is
MIN_SPREAD = 0.7  # the wanted std across images of each normalised embedding dimension (1 = no constant part)
RECIPE = LoopRecipe(base_batch=16, base_lr=1e-3, fast_batch=16)  # larger batches learned less per sample
WARMUP_SAMPLES, SHORT_WARMUP_SAMPLES = 3200, 1600  # the vision stage's warmup; the language and tower stages'
FOLLOW_UP_SHARE, MAX_EARLIER_TURNS = 0.4, 3  # vision-stage questions asked after earlier turns, and how many at most
BACK_REFERENCE_SHARE = 0.15  # refer and vqa rows that follow up on the turn before ("What is it wearing?")
CAPTION_LEAD_SHARE = 0.5  # follow-up rows whose turn just before is a caption request: the longest usual context
SWITCHED_LANGUAGE_SHARE = 0.2  # follow-up rows whose earlier turns are in the other language, as a bilingual user asks
DRAWING_SHARE = 0.2  # vision-stage scenes from the drawing world
DRAWN_LOOK_SHARE = 0.5  # of those, shown with the painter's faults (`drawn_look`), as the VLM sees its drawings
PERTURBED_SHARE = 0.5  # questions edited one to three times (a splice, a filler word, a wrapper) for unseen wordings
CHINESE_SHARE = 0.6  # rows asked in Chinese: its follow-ups and unseen wordings trail the English ones



def world_vlm_config(vocab_size: int) -> VLMConfig:
    """64x64 images, 8x8 patches (from a conv stem) merged 2x2 by the adapter's conv: 16 patch tokens + boi + eoi."""
    text = GLMConfig(vocab_size=vocab_size, hidden_size=192, num_layers=4, num_heads=6, num_kv_groups=2, head_dim=32,
                     ffn_hidden_size=512, norm_eps=1e-5, rope_ratio=1.0, max_seq_len=320)
    vision = ViTConfig(image_size=64, patch_size=8, width=128, depth=4, heads=4, mlp_dim=256, conv_stem=3)
    adapter = AdapterConfig(vision_width=128, hidden=192, ffn=512, conv_width=128)
    return VLMConfig(text=text, vision=vision, adapter=adapter, template="suite")


def is_language_parameter(name: str) -> bool:
    """The GLM core: embeddings, language experts, the shared norms and the output layer."""
    return not (name.startswith(("vision.", "adapter.")) or ".vision_" in name)


def is_text_encoder_parameter(name: str, encoder_layers: int) -> bool:
    """What the diffusion text encoder runs: the embeddings and the language path of its first `encoder_layers`
    layers."""
    if name.startswith("embed."):
        return True
    if not name.startswith("layers.") or ".vision_" in name:
        return False
    return int(name.split(".")[1]) < encoder_layers


def text_encoder_fingerprint(model: VisionLanguageModel) -> str:
    """A hash of the weights the text encoder uses: the VLM and the diffusion model must agree on it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if is_text_encoder_parameter(name, model.config.encoder_layers):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def sample_kind(rng: random.Random) -> str:
    """One task kind per batch: answers of one kind have similar lengths, so little compute goes to padding."""
    kinds = list(TASK_WEIGHTS)
    return rng.choices(kinds, weights=[TASK_WEIGHTS[k] for k in kinds])[0]


def trained_wording(task: Task, rng: random.Random) -> Task:
    """The task in a training phrasing picked by `rng`, with `PERTURBED_SHARE` of them edited
    (`multimodal.phrasing.perturbed_phrase`); asserts that it is no held-out sentence, as `TrainScenes` asserts the
    split of its seeds, so no held-out phrasing can reach a gradient."""
    if rng.random() < PERTURBED_SHARE:
        task = replace(task, prompt=perturbed_phrase(task.form, task.lang, dict(task.slots), rng))
        assert not is_held_out(task.form, task.lang, task.prompt, dict(task.slots)), f"'{task.prompt}' is held out"
        return task
    task = rephrase(task, rng, "train")
    assert task.split == "train", f"'{task.prompt}' is a held-out phrasing"
    return task


def sample_language(rng: random.Random) -> str:
    """The language of a row: Chinese with `CHINESE_SHARE`."""
    return "zh" if rng.random() < CHINESE_SHARE else "en"


def sample_task(scene: Scene, kind: str, rng: random.Random) -> Task:
    """A task of `kind` about the scene in a language from `sample_language`, in a training phrasing."""
    lang = sample_language(rng)
    return trained_wording(rng.choice([t for t in scene_tasks(scene) if t.kind == kind and t.lang == lang]), rng)


def sample_conversation(scene: Scene, kind: str, rng: random.Random) -> tuple[Task, tuple[tuple[str, str], ...]]:
    """The task the batch's row is trained to answer and the (question, answer) turns before it: none, one to
    `MAX_EARLIER_TURNS` about the same scene (`FOLLOW_UP_SHARE`), or for refer and vqa rows with `BACK_REFERENCE_SHARE`
    a follow-up that refers back to the turn just before it ("And how many cats?")."""
    if kind in ("refer", "vqa") and rng.random() < BACK_REFERENCE_SHARE:
        lang = sample_language(rng)
        pairs = [pair for pair in follow_ups(scene, lang, rng) if pair[1].kind == kind]
        if pairs:
            lead, task = rng.choice(pairs)
            history = earlier_turns(scene, task, rng, at_most=MAX_EARLIER_TURNS - 1) if rng.random() < 0.5 else ()
            lead = trained_wording(lead, rng)
            return trained_wording(task, rng), history + ((lead.prompt, lead.answer),)
    task = sample_task(scene, kind, rng)
    return task, earlier_turns(scene, task, rng) if rng.random() < FOLLOW_UP_SHARE else ()


def earlier_turns(scene: Scene, task: Task, rng: random.Random,
                  at_most: int = MAX_EARLIER_TURNS) -> tuple[tuple[str, str], ...]:
    """One to `at_most` earlier (question, answer) turns about the same scene in training phrasings, so the model
    learns to answer a question that comes after others (the image stays in the first turn): in the task's language,
    or with `SWITCHED_LANGUAGE_SHARE` all in the other one, so that the answer follows its own question's language
    rather than the conversation's. With `CAPTION_LEAD_SHARE` the last of them asks for a caption."""
    lang = task.lang if rng.random() >= SWITCHED_LANGUAGE_SHARE else {"en": "zh", "zh": "en"}[task.lang]
    options = [t for t in scene_tasks(scene)  # grounded captions are long: the context holds three earlier turns
               if t.lang == lang and t.kind not in ("draw", "grounded_caption")
               and (t.form, t.slots) != (task.form, task.slots)]
    captions = [t for t in options if t.kind == "caption"]
    # A scene has one caption form per language among dozens of questions: without this share a question rarely
    # follows a description, the first turn users most often start with.
    if captions and rng.random() < CAPTION_LEAD_SHARE:
        lead = rng.choice(captions)
        others = [t for t in options if t.kind != "caption"]
        picked = rng.sample(others, min(len(others), rng.randint(0, at_most - 1))) + [lead]
    else:
        picked = rng.sample(options, min(len(options), rng.randint(1, at_most)))
    return tuple((t.prompt, t.answer) for t in (trained_wording(t, rng) for t in picked))


def answer_rows(processor: Processor, tokenizer: GLMTokenizer, tasks: list[Task], with_image: bool,
                histories: list[tuple] | None = None):
    """(before, after) token rows with the answer and stop token appended, and the answer lengths; each row after its
    history of earlier turns when `histories` are given, less its oldest turns where the row would outgrow the context
    (long Chinese captions before a long answer)."""
    stop = tokenizer.token_id(STOP_TOKEN)
    context = processor.config.text.max_seq_len - (processor.config.image_tokens if with_image else 0)
    rows, lengths = [], []
    for index, task in enumerate(tasks):
        history = tuple(histories[index]) if histories is not None else ()
        answer = tokenizer.encode(task.answer) + [stop]
        before, after = processor.prompt_ids(task.prompt, history, with_image=with_image)
        while history and len(before) + len(after) + len(answer) > context:
            history = history[1:]
            before, after = processor.prompt_ids(task.prompt, history, with_image=with_image)
        rows.append((before, after + answer))
        lengths.append(len(answer))
    return rows, lengths


def answer_loss(logits: torch.Tensor, input_ids: torch.Tensor, lengths: list[int],
                reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the answer tokens, which end every row (the processor right-aligns rows): their mean, or with
    `reduction` "sum" their sum."""
    labels = torch.full_like(input_ids, -100)
    for row, length in enumerate(lengths):
        labels[row, -length:] = input_ids[row, -length:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction=reduction)


class PatchDetectionHead(nn.Module):
    """ViT patch features [B, g*g, W] -> per patch: the class of the object whose box centre lies in it (or none) and
    that object's box; from the mean feature, the background colour."""

    def __init__(self, width: int):
        super().__init__()
        self.classes = nn.Linear(width, len(CLASSES) + 1)  # 0: no object centred here
        self.boxes = nn.Linear(width, 4)
        self.background = nn.Linear(width, len(COLOURS))

    def loss(self, features: torch.Tensor, scenes: list[Scene]) -> torch.Tensor:
        grid = round(features.shape[1] ** 0.5)
        classes, boxes = (t.to(features.device) for t in patch_targets(scenes, grid))  # [B, g*g], [B, g*g, 4]
        colours = torch.tensor([list(COLOURS).index(scene.background.colour) for scene in scenes],
                               device=features.device)
        per_cell = F.cross_entropy(self.classes(features).transpose(1, 2), classes, reduction="none")  # [B, g*g]
        centred = classes > 0
        # Objects are centred in a few of the 64 patches: balance them against the empty ones, or "none" everywhere
        # is a good-enough answer and recognition is learned late.
        class_loss = per_cell[~centred].mean() + (per_cell[centred].mean() if centred.any() else 0.0)
        box_loss = F.l1_loss(self.boxes(features)[centred].sigmoid(), boxes[centred]) if centred.any() else 0.0
        colour_loss = F.cross_entropy(self.background(features.mean(1)), colours)
        return class_loss + BOX_LOSS_WEIGHT * box_loss + colour_loss


def spread_loss(image_embeds: torch.Tensor) -> torch.Tensor:
    """image_embeds [B, n, H] (patch tokens) -> how far each dimension's std across the batch, after RMS
    normalisation per token, falls short of MIN_SPREAD (a hinge, as VICReg's variance term)."""
    normalized = image_embeds * torch.rsqrt(image_embeds.pow(2).mean(-1, keepdim=True) + 1e-6)  # [B, n, H]
    return F.relu(MIN_SPREAD - normalized.std(0)).mean()


def centre_cell(box: tuple[int, int, int, int], grid: int) -> int:
    """The row-major index of the cell of a grid x grid partition of the image that holds a per-mille box's centre."""
    x0, y0, x1, y1 = box
    return min(grid - 1, (y0 + y1) * grid // 2000) * grid + min(grid - 1, (x0 + x1) * grid // 2000)


def patch_targets(scenes: list[Scene], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class ids [B, g*g] (0 = none, else 1 + index in CLASSES) and boxes [B, g*g, 4] in [0, 1]; where two objects
    are centred in one patch, the larger one."""
    names = list(CLASSES)
    classes = torch.zeros(len(scenes), grid * grid, dtype=torch.long)
    boxes = torch.zeros(len(scenes), grid * grid, 4)
    for row, scene in enumerate(scenes):
        placed = [(scene.box_per_mille(i), obj.name) for i, obj in enumerate(scene.objects)]
        for (x0, y0, x1, y1), name in sorted(placed, key=lambda p: (p[0][2] - p[0][0]) * (p[0][3] - p[0][1])):
            # large ones last, so they win a shared patch
            cell = centre_cell((x0, y0, x1, y1), grid)
            classes[row, cell] = 1 + names.index(name)
            boxes[row, cell] = torch.tensor([x0, y0, x1, y1]) / 1000
    return classes, boxes


def object_patch_accuracy(model: VisionLanguageModel, head: PatchDetectionHead, count: int = 128) -> float:
    """On `count` val scenes: the fraction of patches holding an object's centre that the head names right."""
    from multimodal.training.loop import scene_pixels
    from multimodal.world import make_scene, split_seeds

    scenes = [make_scene(seed) for seed in split_seeds("val", count)]
    size = model.vlm_config.vision.image_size
    pixels = _normalize(torch.stack([scene_pixels(scene, size) for scene in scenes]), model.vlm_config)  # [B, 3, S, S]
    with torch.no_grad():
        features = model.vision(pixels)  # [B, g*g, W]
        classes, _ = patch_targets(scenes, round(features.shape[1] ** 0.5))
        centred = classes > 0
        return (head.classes(features).argmax(-1)[centred] == classes[centred]).float().mean().item()


def lookup_attention(model: VisionLanguageModel, layer_input: torch.Tensor, inputs) -> torch.Tensor:
    """The attention probabilities [B, LOOKUP_HEADS, T, T] of the first `LOOKUP_HEADS` heads (one KV group) of the
    first grown layer, recomputed from that layer's input [B, T, C] as its forward computes them."""
    layer = model.layers[model.config.num_layers - GROWN_LAYERS]
    attn = layer.attn
    start = inputs.image_start
    end = start + inputs.image_tokens - 1  # boi and the patches take the vision expert, as in forward_image
    q, k, _ = attn.split_qkv(route_experts(attn.qkv, attn.vision_qkv, layer.attn_norm(layer_input), start, end))
    cos, sin = model.rope(inputs.positions)
    q = apply_rotary(q[:, :LOOKUP_HEADS], cos, sin)  # [B, h, T, D]
    k = apply_rotary(k[:, :1], cos, sin)  # [B, 1, T, D]: the KV group of those heads
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, h, T, T]
    allowed = attention_mask_for(inputs.attention_mask, 0, layer_input.shape[1])  # [B, 1, T, T]
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def question_class(scene: Scene, task: Task) -> str | None:
    """The class a question looks for: the referred object's, or the one class a VQA question names (present in the
    scene or not); None for other questions."""
    if task.kind == "refer" and task.target is not None:
        return scene.objects[task.target].name
    if task.kind not in ("refer", "vqa"):
        return None
    named = mentioned_classes(task.prompt, task.lang)
    return named.pop() if len(named) == 1 else None


def lookup_cells(scene: Scene, task: Task, grid: int) -> list[int]:
    """The image cells (of a grid x grid partition) holding the centres of what a question looks for: the referred
    object, or every object of the class a VQA question names (none when the scene has none: the answer is then
    that nothing matches)."""
    if task.kind == "refer":
        return [] if task.target is None else [centre_cell(scene.box_per_mille(task.target), grid)]
    name = question_class(scene, task)
    return sorted({centre_cell(scene.box_per_mille(index), grid)
                   for index, obj in enumerate(scene.objects) if obj.name == name}) if name else []


def query_loss(classifier: nn.Linear, layer_input: torch.Tensor, lengths: list[int],
               names: list[str | None], reduction: str = "mean") -> torch.Tensor | None:
    """Cross-entropy of the class a question looks for, read linearly from the lookup layer's input at the position
    that predicts the first answer token; rows without a class do not count. None when no row has one; with
    `reduction` "none", one loss per row that counts.

    The lookup can only match what that position's query holds, and the frozen text-encoder layers were trained on
    text alone, where the class asked about hardly changes the answer, so they have no reason to carry it there.
    This asks the trainable layer below to gather it."""
    rows = [row for row, name in enumerate(names) if name is not None]
    if not rows:
        return None
    length = layer_input.shape[1]
    queries = torch.stack([layer_input[row, length - lengths[row] - 1] for row in rows])  # [R, C]
    targets = torch.tensor([list(CLASSES).index(names[row]) for row in rows], device=layer_input.device)
    return F.cross_entropy(classifier(queries), targets, reduction=reduction)


def lookup_loss(model: VisionLanguageModel, layer_input: torch.Tensor, inputs, lengths: list[int],
                cells: list[list[int]], reduction: str = "mean") -> torch.Tensor | None:
    """-log of the attention that `lookup_attention`'s heads pay, from each position that predicts an answer token,
    to the image tokens of the row's `lookup_cells` (the tokens the detection head teaches to carry those objects'
    boxes); rows without cells do not count. None when no row has cells; with `reduction` "none", one loss per row
    that counts.

    The answer loss alone teaches the region words ("the dog on the left") long before the class words ("the dog",
    "Is there a dog?"; see `multimodal eval ground|vqa`'s breakdowns), since finding an object by what it is takes
    a content match between the question and the image tokens; this hands that match to a few heads directly, as
    supervised attention does. lengths are the answer lengths that end each row.
    """
    probs = lookup_attention(model, layer_input, inputs)
    length = layer_input.shape[1]
    losses = []
    for row, (answer_length, row_cells) in enumerate(zip(lengths, cells)):
        if not row_cells:
            continue
        predicting = slice(length - answer_length - 1, length - 1)  # the positions whose logits are answer tokens
        keys = [inputs.image_start + 1 + cell for cell in row_cells]
        on_target = probs[row, :, predicting][..., keys].sum(-1)  # [h, answer_length]
        losses.append(-torch.log(on_target + 1e-6).mean())
    if not losses:
        return None
    return torch.stack(losses).mean() if reduction == "mean" else torch.stack(losses)


def grow(model: VisionLanguageModel, config: VLMConfig, count: int) -> tuple[VisionLanguageModel, VLMConfig]:
    """A copy of `model` with `count` more layers on top, each a copy of its last layer with the attention and MLP
    output projections (both experts) at zero: the residual stream passes through unchanged. The text encoder keeps
    reading the layer it read before."""
    text = replace(config.text, num_layers=config.text.num_layers + count,
                   text_encoder_layers=config.text.encoder_layers)
    grown_config = replace(config, text=text)
    grown = VisionLanguageModel(grown_config)
    state = model.state_dict()
    source = f"layers.{config.text.num_layers - 1}."
    last_layer = {name[len(source):]: tensor for name, tensor in state.items() if name.startswith(source)}
    for index in range(config.text.num_layers, text.num_layers):
        state.update({f"layers.{index}.{name}": tensor.clone() for name, tensor in last_layer.items()})
    grown.load_state_dict(state, strict=True)
    with torch.no_grad():
        for layer in grown.layers[config.text.num_layers:]:
            for projection in (layer.attn.dense, layer.attn.vision_dense, layer.mlp.down, layer.vision_mlp.down):
                projection.weight.zero_()
                if projection.bias is not None:
                    projection.bias.zero_()
    return grown, grown_config


def _normalize(pixels: torch.Tensor, config: VLMConfig) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> the processor's normalisation (multimodal.image.to_tensor), on the pixels' device."""
    mean = torch.tensor(config.vision.mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(config.vision.std, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def train_vlm(
    out_dir: str | Path, tokenizer: GLMTokenizer, seed: int = 0, steps: int = 3000, language_steps: int = 400,
    tower_steps: int = 2000, scenes: int = 20000, minutes: float | None = None, init: str | Path | None = None,
    settings: LoopSettings | None = None, drawing_share: float = DRAWING_SHARE,
) -> Path:  # fmt: skip
    """All three stages; or, with `init` (a finished VLM, such as the shipped one), a further vision stage that
    starts from its weights (its detection heads start afresh) under a schedule of its own. `drawing_share` of the
    vision stage's scenes come from the drawing world."""
    out_dir = Path(out_dir)
    settings = settings or RECIPE.settings()
    torch.manual_seed(seed)
    if init is None:
        model, head = _language_and_tower(out_dir, tokenizer, seed, language_steps, tower_steps, scenes, settings)
        model, _ = grow(model, model.vlm_config, GROWN_LAYERS)
        # The vision expert of every layer starts as a copy of its language expert, as CogVLM does.
        for layer in model.layers:
            layer.attn.vision_qkv.load_state_dict(layer.attn.qkv.state_dict())
            layer.attn.vision_dense.load_state_dict(layer.attn.dense.state_dict())
            layer.vision_mlp.load_state_dict(layer.mlp.state_dict())
    else:
        model = load_vlm(init)
        text = model.vlm_config.text
        if text.text_encoder_layers is None or text.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"{init} is not a grown world VLM for this tokenizer; train one from scratch first.")
        head = PatchDetectionHead(model.vlm_config.vision.width)
    if not 0 <= drawing_share <= 1:
        raise ValueError(f"The drawing share is a fraction from 0 to 1, not {drawing_share}.")
    recipe = {"drawing_share": drawing_share} | ({"init": str(init)} if init is not None else {})
    return _vision_stage(out_dir, model, head, tokenizer, seed, steps, scenes, minutes, settings, recipe)


def _language_and_tower(out_dir: Path, tokenizer: GLMTokenizer, seed: int, language_steps: int, tower_steps: int,
                        scenes: int, settings: LoopSettings) -> tuple[VisionLanguageModel, PatchDetectionHead]:
    """Stages 1 and 2: the model with a trained core and tower, and the tower's detection head."""
    config = world_vlm_config(tokenizer.vocab_size)
    processor = Processor(tokenizer, config, pad_id=tokenizer.pad_id)
    pool = TrainScenes(scenes, config.vision.image_size, cached=settings.cached)
    batch_size, lr, device = settings.batch_size, settings.lr, settings.runtime.device
    loop = {"runtime": settings.runtime, "batch_size": batch_size}
    meta = {**config.to_dict(), "seed": seed}  # the native VLM format (vlm.convert.load_vlm) plus the recipe

    # Stage 1: the language core on text alone.
    model = VisionLanguageModel(config).init_weights(generator=torch.Generator().manual_seed(seed)).to(device)
    language = [p for n, p in model.named_parameters() if is_language_parameter(n)]
    optimizer = torch.optim.AdamW(language, lr=lr, weight_decay=0.01)
    run = Run(out_dir / "language", KIND, {**meta, "stage": "language", "language_steps": language_steps})

    def language_loss(step: int) -> torch.Tensor:
        rng = random.Random(f"vlm-language-{seed}-{step}")
        kind = sample_kind(rng)
        tasks = my_share([sample_task(pool.scene(s), kind, rng) for s in pool.batch_seeds(rng, batch_size)])
        rows, lengths = answer_rows(processor, tokenizer, tasks, with_image=False)
        inputs = processor.layout(rows, 0).to(device)
        logits = model(inputs.input_ids, positions=inputs.positions, attention_mask=inputs.attention_mask)
        return answer_loss(logits, inputs.input_ids, lengths)

    train(run, model, optimizer, settings.schedule(language_steps, SHORT_WARMUP_SAMPLES), language_loss, **loop)

    # Stage 2: the ViT alone learns the world's objects from the per-patch detection head (fast: no language model
    # in the loop), as CogVLM starts from a pretrained tower. (a resumed run overwrites all of this with its
    # checkpoint)
    with torch.no_grad():
        for module in model.vision.modules():  # convs from PyTorch's init: at std 0.02 a conv stack fades the image
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()
        for name, param in model.named_parameters():  # zero biases: the image, not a constant, leads the features
            if name.startswith(("vision.", "adapter.")) and name.endswith(".bias") and "norm" not in name:
                param.zero_()
    head = PatchDetectionHead(config.vision.width).to(device)
    tower = list(model.vision.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(tower, lr=lr, weight_decay=0.01)
    run = Run(out_dir / "tower", KIND, {**meta, "stage": "tower", "tower_steps": tower_steps})

    def tower_loss(step: int) -> torch.Tensor:
        rng = random.Random(f"vlm-tower-{seed}-{step}")
        seeds = my_share(pool.batch_seeds(rng, batch_size))
        pixels = _normalize(torch.stack([pool.pixels(s) for s in seeds]).to(device), config)  # [B, 3, S, S]
        return head.loss(model.vision(pixels), [pool.scene(s) for s in seeds])

    def tower_evaluate() -> str:
        return f"val object-patch accuracy {object_patch_accuracy(model, head):.3f}"

    train(run, model, optimizer, settings.schedule(tower_steps, SHORT_WARMUP_SAMPLES), tower_loss, extra=head,
          evaluate=tower_evaluate, evaluate_every=500, **loop)

    return model, head


def vision_heads(config: VLMConfig, head: PatchDetectionHead) -> nn.ModuleDict:
    """The vision stage's training-only heads: the tower's detection head; a second one on the adapter's image
    tokens, so that each token the core sees names its object and box; a linear probe of the class a question looks
    for where the lookup happens (`query_loss`)."""
    return nn.ModuleDict({"tower": head, "tokens": PatchDetectionHead(config.text.hidden_size),
                          "query": nn.Linear(config.text.hidden_size, len(CLASSES))})


def vision_pool(scenes: int, image_size: int, cached: bool, drawing_share: float = DRAWING_SHARE) -> MixedScenes:
    """The vision stage's scenes: the default world, and with `drawing_share` the drawing world, whose single large
    entities the VLM must also know to judge what the text-to-image model draws (`multimodal eval draw`)."""
    pools = [TrainScenes(scenes, image_size, cached=cached), TrainScenes(scenes, image_size, DRAWING, cached=cached)]
    return MixedScenes(pools, [1 - drawing_share, drawing_share])


def drawn_look_seed(key: tuple[int, int] | int, rng: random.Random, share: float = DRAWN_LOOK_SHARE) -> int | None:
    """The seed of `drawn_look` for a scene of `vision_pool` (a (pool, seed) key), or None to show it clean: only
    drawing-world scenes (pool 1), `share` of them; a single pool's plain seed (a validation pool) stays clean.
    Drawn for every row before the rows are shared out, so that data-parallel processes see what one process would."""
    pick, look_seed = rng.random(), rng.getrandbits(31)
    drawing_world = isinstance(key, tuple) and key[0] == 1
    return look_seed if drawing_world and pick < share else None


def vision_step_loss(model: VisionLanguageModel, heads: nn.ModuleDict, tokenizer: GLMTokenizer, pool,
                     seed: int, batch_size: int, device: str = "cpu", groups: int = 1):
    """step -> (loss, components) on the vision stage's batch of that step: the answer, detection, spread, lookup
    and query losses. With `groups` > 1 the core runs the batch's rows in up to that many groups of similar length
    (`length_groups`), which spends less on padding (rows with earlier turns are several times longer than rows
    without); the losses are the same sums over the same rows."""
    config = model.vlm_config
    processor = Processor(tokenizer, config, pad_id=tokenizer.pad_id)

    def vision_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng = random.Random(f"vlm-vision-{seed}-{step}")
        kind = sample_kind(rng)
        seeds = pool.batch_seeds(rng, batch_size)
        scenes = [pool.scene(s) for s in seeds]
        tasks, histories = zip(*(sample_conversation(scene, kind, rng) for scene in scenes))
        looks = [drawn_look_seed(key, rng) for key in seeds]
        # a data-parallel process's share of the rows (`multimodal.training.parallel`)
        seeds, scenes, tasks, histories, looks = (my_share(rows) for rows in (seeds, scenes, tasks, histories, looks))
        rows, lengths = answer_rows(processor, tokenizer, tasks, with_image=True, histories=histories)
        images = [pool.pixels(key) if look is None else drawn_look(pool.pixels(key), look)
                  for key, look in zip(seeds, looks)]
        pixels = _normalize(torch.stack(images), config).to(device)  # [B, 3, S, S]
        features = model.vision(pixels)  # [B, g*g, W]
        image_embeds = model.adapter(features)  # [B, n, H]: boi, patches, eoi
        patches = image_embeds[:, 1:-1]  # [B, n - 2, H]
        grid = round(patches.shape[1] ** 0.5)
        cells = [lookup_cells(scene, task, grid) for scene, task in zip(scenes, tasks)]
        names = [question_class(scene, task) for scene, task in zip(scenes, tasks)]
        answer_sum, lookups, queries = 0.0, [], []
        for group in length_groups([len(before) + len(after) for before, after in rows], groups):
            inputs = processor.layout([rows[i] for i in group], config.image_tokens).to(device)
            logits, hidden_states = model(inputs.input_ids, image_embeds=image_embeds[group],
                                          image_start=inputs.image_start, positions=inputs.positions,
                                          attention_mask=inputs.attention_mask, output_hidden_states=True)
            group_lengths = [lengths[i] for i in group]
            answer_sum = answer_sum + answer_loss(logits, inputs.input_ids, group_lengths, reduction="sum")
            lookup_input = hidden_states[config.text.num_layers - GROWN_LAYERS]
            lookups.append(lookup_loss(model, lookup_input, inputs, group_lengths, [cells[i] for i in group],
                                       reduction="none"))
            queries.append(query_loss(heads["query"], lookup_input, group_lengths, [names[i] for i in group],
                                      reduction="none"))
        parts = {"answer": answer_sum / sum(lengths),
                 "detection": heads["tower"].loss(features, scenes) + heads["tokens"].loss(patches, scenes),
                 "spread": spread_loss(patches)}
        for name, by_group in (("lookup", lookups), ("query", queries)):
            counted = [losses for losses in by_group if losses is not None]  # a group may have no row that counts
            if counted:
                parts[name] = torch.cat(counted).mean()
        return sum(parts.values()), {name: value.item() for name, value in parts.items()}

    return vision_loss


def freeze_text_encoder(model: VisionLanguageModel) -> None:
    """The vision stage trains all but the text encoder's part (embeddings, every original layer but the last)."""
    for name, param in model.named_parameters():
        param.requires_grad_(not is_text_encoder_parameter(name, model.config.encoder_layers))


def _vision_stage(out_dir: Path, model: VisionLanguageModel, head: PatchDetectionHead, tokenizer: GLMTokenizer,
                  seed: int, steps: int, scenes: int, minutes: float | None, settings: LoopSettings,
                  recipe: dict) -> Path:
    """Stage 3 on a grown model (LLaMA-Pro's block expansion: GROWN_LAYERS copies of the language-stage core's last
    layer whose output projections start at zero). The text encoder's part (embeddings and every original layer but
    the last) is frozen. With only the last layer free, text tokens could not first read the question and then look
    up its object among the image tokens. (a resumed run overwrites the starting weights with its checkpoint)"""
    device = settings.runtime.device
    model = model.to(device)
    config = model.vlm_config
    pool = vision_pool(scenes, config.vision.image_size, settings.cached, recipe["drawing_share"])
    freeze_text_encoder(model)
    meta = {**config.to_dict(), "seed": seed, **recipe}
    fingerprint = text_encoder_fingerprint(model)
    heads = vision_heads(config, head).to(device)
    vision = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    optimizer = torch.optim.AdamW(vision, lr=settings.lr, weight_decay=0.01)
    run = Run(out_dir, KIND, {**meta, "stage": "vision", "text_encoder_fingerprint": fingerprint})
    run.model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(run.model_dir / "tokenizer.json")  # what the exported VLM reads its text with
    step_loss = vision_step_loss(model, heads, tokenizer, pool, seed, settings.batch_size, device, settings.groups)
    train(run, model, optimizer, settings.schedule(steps, WARMUP_SAMPLES), step_loss, minutes=minutes, extra=heads,
          runtime=settings.runtime, batch_size=settings.batch_size)
    assert text_encoder_fingerprint(model) == fingerprint, "the frozen text encoder changed during the vision stage"
    return run.model_dir
