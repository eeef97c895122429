"""The suite as one object: chat, ground, caption and draw, for the CLI, the demo and the API server.

`Engine` holds two parts that share one GLM language core: the chat model (tokenizer + vision-language model, whose
language model is the GLM) and the painter (the text-to-image pipeline, whose text encoder runs that same GLM).
It adds no model logic: it turns user-level calls into the library's calls and the answers into what a user sees
(text with boxes removed, pixel boxes, images).

Ways to build one:
- `Engine.load(checkpoint=None, ...)`: a suite folder (see `save`), or the models embedded in the package when no
  checkpoint is given. Models are built on the meta device; `--quant` quantizes a float checkpoint while it is read
  (`multimodal.quantize.load_weights`), and a checkpoint written by `multimodal quantize` loads as stored. Under
  `--tp N` each rank reads only its slices of native checkpoints (`multimodal.tp.load_sharded`) and quantizes its
  shards after the cut.
- `Engine.random_tiny(seed)`: tiny models with random weights, built in about a second. They answer gibberish, but
  through the real code paths, so tests of the CLI, the server and the demo use them (saved with `save` when a
  subprocess needs a checkpoint folder). They are never a default.

The parts' interface, which `vlm.chat.VLMChat` and `diffusion.pipeline.RelayPipeline` provide:
- chat model: `stream(image, turns, sampling, usage=None) -> Iterator[str]` (text deltas) and
  `answer_batch(images, turns_list, sampling, usages=None) -> list[str]`, where `turns` is a list of (role, text)
  pairs ending with the user's question and each `vlm.chat.Usage` handed in is filled in (tokens, finish reason).
- painter: `__call__(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
  num_images_per_prompt, seed, callback)` -> an object with `base` and `relay` lists of PIL images, and `sizes`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from multimodal.image import draw_boxes
from vlm.chat import Usage
from vlm.grounding import parse_grounding, pixel_boxes

EMBEDDED_DIR = Path(__file__).resolve().parent / "assets"  # the models shipped in the package, when trained
VLM_FOLDER = "vlm"  # a suite folder: the VLM (with its tokenizer) ...
DIFFUSION_FOLDER = "diffusion"  # ... and the text-to-image pipeline, whose text encoder is the VLM's GLM
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_TEXTS = ["Describe the image.", "Describe the image with boxes.", "Where is the dog?", "a dog with a hat",
              "a cat wearing sunglasses on a blue background", "two apples and a car", "一只戴帽子的狗"]

Turn = tuple[str, str]  # (role, text): role is "user" or "assistant"


EMBEDDED_NAME = "glm-multimodal-emoji"


class EngineError(ValueError):
    """A request the engine cannot serve as asked; the message is one sentence meant for the user."""


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}.")
        if self.temperature < 0:
            raise EngineError(f"temperature must be at least 0, not {self.temperature}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], not {self.top_p}.")


@dataclass(frozen=True)
class ChatRequest:
    image: Image.Image | None
    question: str
    history: tuple[Turn, ...] = ()
    sampling: Sampling = Sampling()
    role: str = "user"  # whose message `question` is: the user's, or a tool's result ("observation")
    tools: tuple[dict, ...] = ()  # OpenAI-style function tools (text models only)
    tool_choice: str | dict = "auto"  # as OpenAI's: none, auto, required, or {"function": {"name": ...}}


@dataclass
class GroundedAnswer:
    """An answer and the boxes it names, converted to pixels of the image it was asked about."""

    text: str  # as the model wrote it, boxes included
    plain_text: str  # boxes removed
    boxes: list[tuple[str, tuple[float, float, float, float]]]  # (phrase, (x0, y0, x1, y1) in pixels)
    problems: list[str] = field(default_factory=list)  # malformed boxes the model wrote, one sentence each

    @classmethod
    def parse(cls, text: str, image: Image.Image | None) -> GroundedAnswer:
        grounding = parse_grounding(text)
        boxes = pixel_boxes(grounding, *image.size) if image is not None else []
        return cls(text=text, plain_text=grounding.text, boxes=boxes, problems=grounding.problems)

    def drawn_on(self, image: Image.Image) -> Image.Image:
        return draw_boxes(image, self.boxes)


@dataclass
class Drawing:
    prompt: str
    seed: int
    base: list[Image.Image]  # the low-resolution first stage
    relay: list[Image.Image]  # the final images after the relay super-resolution stage


class Engine:
    """See the module docstring; build with `load`, `from_args` or `random_tiny`."""

    def __init__(self, chat_model, painter, name: str, caption_prompt: str, grounded_caption_prompt: str,
                 scene_maker: Callable[[int], Image.Image] | None = None):
        self.chat_model = chat_model
        self.painter = painter
        self.name = name
        self.caption_prompt = caption_prompt
        self.grounded_caption_prompt = grounded_caption_prompt
        self.scene_maker = scene_maker

    # --- building ------------------------------------------------------------------------------------------------

    @classmethod
    def from_parts(cls, chat_model, painter, name: str) -> Engine:
        """An engine over already built parts, with the EmojiScenes prompts and scenes."""
        from multimodal.language import CAPTION_PROMPTS, GROUNDED_PROMPTS
        from multimodal.world import make_scene, render

        template = getattr(chat_model, "template", None) or getattr(getattr(chat_model, "processor", None),
                                                                    "template", "suite")
        if template == "suite":
            caption, grounded = CAPTION_PROMPTS["en"], GROUNDED_PROMPTS["en"]
        else:  # real CogVLM-family checkpoints were trained with these
            from vlm.processor import GROUNDED_CAPTION_PROMPT

            caption, grounded = "Describe the image.", GROUNDED_CAPTION_PROMPT
        return cls(chat_model, painter, name, caption, grounded, scene_maker=lambda seed: render(make_scene(seed)))

    @classmethod
    def load(cls, checkpoint: str | Path | None = None, quant: str = "none", group_size: int = 64,
             device: str = "cpu", dtype: str = "float32", tp: int = 1, exclude: Sequence[str] = ()) -> Engine:
        """A suite folder (`vlm/` and optionally `diffusion/`), a lone VLM folder (no drawing), a GLM text model's
        folder (ChatGLM3, GLM-4 chat: chat and tool calls only), or the embedded models when `checkpoint` is None.

        `quant` ("int8" / "int4" with `group_size`; Linear layers matching an `exclude` glob stay in float) applies
        to the VLM, whose GLM is also the painter's text encoder, and to both denoisers (INT4 keeps the GLM layers
        that encode the painter's prompts in float, `_Loading.keep_text_encoder_in_float`); a VLM checkpoint written
        by `multimodal quantize` loads as stored. With `tp` > 1 (under torchrun) every rank builds the models on the
        meta device and reads only its own slices of native checkpoints, then quantizes its shards.
        """
        from diffusion.text_encoder import GLMTextEncoder
        from glm.tokenizer import GLMTokenizer
        from vlm.chat import VLMChat

        if dtype not in DTYPES:
            raise EngineError(f"Unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}.")
        if tp < 1:
            raise EngineError(f"--tp must be at least 1, not {tp}.")
        folder = Path(checkpoint) if checkpoint is not None else EMBEDDED_DIR
        if checkpoint is None and not (folder / VLM_FOLDER / "config.json").exists():
            raise EngineError("This installation has no embedded models yet; pass --checkpoint FOLDER (a suite "
                              "folder with vlm/ and diffusion/) or train them with `multimodal train`.")
        if not folder.exists():
            raise EngineError(f"The checkpoint {folder} does not exist.")
        loading = _Loading(quant, group_size, tuple(exclude), device, DTYPES[dtype], tp)
        family = _chat_only_family(folder)
        if family == "glm4v":
            from vlm.glm4v_chat import Glm4vChat, ImageSettings

            chat = Glm4vChat(loading.glm4v(folder), GLMTokenizer.load(folder), ImageSettings.from_folder(folder))
            return cls.from_parts(chat, None, folder.resolve().name)
        if family == "glm":
            from glm.chat import GLMChat

            return cls.from_parts(GLMChat(loading.decode_ready(loading.glm(folder)), GLMTokenizer.load(folder)), None,
                                  folder.resolve().name)
        vlm_folder = folder / VLM_FOLDER if (folder / VLM_FOLDER).is_dir() else folder
        if (folder / DIFFUSION_FOLDER).is_dir():
            loading.keep_text_encoder_in_float(vlm_folder)
        model = loading.decode_ready(loading.vlm(vlm_folder))
        chat_folder = vlm_folder if (vlm_folder / "tokenizer.json").exists() or \
            (vlm_folder / "tokenizer.model").exists() else folder
        tokenizer = GLMTokenizer.load(chat_folder)
        painter = None
        if (folder / DIFFUSION_FOLDER).is_dir():
            recorded = painter_tokenizer_path(folder / DIFFUSION_FOLDER)
            same = recorded is None or recorded.resolve() == (chat_folder / "tokenizer.json").resolve()
            prompts = tokenizer if same else GLMTokenizer.load(recorded)
            painter = loading.painter(folder / DIFFUSION_FOLDER, GLMTextEncoder.from_tokenizer(model, prompts))
        name = EMBEDDED_NAME if checkpoint is None else folder.resolve().name
        return cls.from_parts(VLMChat(model, tokenizer), painter, name)

    @classmethod
    def from_args(cls, args) -> Engine:
        """From the shared model options (`multimodal/commands/_options.py`)."""
        torch.manual_seed(args.seed)
        return cls.load(args.checkpoint, args.quant, args.group_size, args.device, args.dtype, args.tp,
                        getattr(args, "exclude", ()))

    @classmethod
    def random_tiny(cls, seed: int = 0) -> Engine:
        """Tiny models with random weights and a tiny tokenizer: real code paths, gibberish answers, flat-ish
        pictures. For tests of the layers above the models (and, saved with `save`, of commands in subprocesses)."""
        from diffusion.denoiser import DiT, dit_config
        from diffusion.pipeline import RelayConfig, RelayPipeline
        from diffusion.text_encoder import GLMTextEncoder
        from glm.tokenizer import train_bpe
        from vlm.chat import VLMChat
        from vlm.model import VisionLanguageModel, VLMConfig

        tokenizer = train_bpe(TINY_TEXTS, vocab_size=320)
        preset = VLMConfig.from_preset("tiny")
        config = replace(preset, text=replace(preset.text, vocab_size=tokenizer.vocab_size))
        generator = torch.Generator().manual_seed(seed)
        model = VisionLanguageModel(config).init_weights(generator=generator).eval()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            base = DiT(dit_config("tiny", text_dim=config.text.hidden_size))
            relay = DiT(dit_config("tiny", text_dim=config.text.hidden_size))
        painter = RelayPipeline(GLMTextEncoder.from_tokenizer(model, tokenizer), base, relay,
                                RelayConfig(sizes=((32, 32), (16, 16)), base_steps=2, relay_steps=2))
        return cls.from_parts(VLMChat(model, tokenizer), painter, "random-tiny")

    def save(self, folder: str | Path) -> Path:
        """Write a suite folder that `load` reads: `vlm/` (weights, config, tokenizer) and `diffusion/`, whose config
        records the tokenizer its prompts are read with (`tokenizer.json` beside them: it may cut text differently
        from the chat model's)."""
        from diffusion.pipeline import save_relay_pipeline
        from vlm.convert import save_vlm

        folder = Path(folder)
        save_vlm(self.chat_model.model, folder / VLM_FOLDER)
        self.chat_model.tokenizer.save(folder / VLM_FOLDER / "tokenizer.json")
        if self.painter is not None:
            prompts = self.painter.text_encoder.tokenizer or self.chat_model.tokenizer
            prompts.save(folder / "tokenizer.json")
            encoder = {"checkpoint": f"../{VLM_FOLDER}", "format": "vlm", "tokenizer": "../tokenizer.json"}
            save_relay_pipeline(folder / DIFFUSION_FOLDER, self.painter.base, self.painter.relay, self.painter.config,
                                encoder)
        return folder

    # --- understanding -------------------------------------------------------------------------------------------

    @property
    def sees_images(self) -> bool:
        return getattr(self.chat_model, "sees_images", True)

    def chat_stream(self, image: Image.Image | None, question: str, history: Sequence[Turn] = (),
                    sampling: Sampling = Sampling(), usage: Usage | None = None, *, role: str = "user",
                    tools: Sequence[dict] = (), tool_choice: str | dict = "auto") -> Iterator[str]:
        """Text deltas of the answer to `question` (a message of `role`) about `image`, after the earlier `history`
        turns; `usage` (a `vlm.chat.Usage`) is filled in when the answer ends. `tools` and `tool_choice` as in
        `glm.chat.GLMChat.plan_tools`, for text models."""
        turns = self._turns(role, question, history)
        options = {} if usage is None else {"usage": usage}
        if tools or tool_choice != "auto":
            if self.sees_images:
                raise EngineError("This model does not call tools; tools need a GLM text model (ChatGLM3, GLM-4).")
            options.update(tools=tuple(tools), tool_choice=tool_choice)
        if image is not None and not self.sees_images:
            raise EngineError("This is a text model; it cannot see images. Send the question without one.")
        return self.chat_model.stream(image, turns, sampling, **options)

    def chat(self, image: Image.Image | None, question: str, history: Sequence[Turn] = (),
             sampling: Sampling = Sampling(), *, role: str = "user", tools: Sequence[dict] = (),
             tool_choice: str | dict = "auto") -> str:
        return "".join(self.chat_stream(image, question, history, sampling, role=role, tools=tools,
                                        tool_choice=tool_choice))

    def chat_batch(self, requests: Sequence[ChatRequest], usages: Sequence[Usage] | None = None) -> list[str]:
        """Answer several independent requests; greedy ones with an image (any, for a text model) and the same
        length limit run as one batch, and every answer is the one the request gets alone. `usages`, one per
        request, are filled in."""
        usages = list(usages) if usages is not None else [Usage() for _ in requests]
        answers: list[str | None] = [None] * len(requests)
        groups: dict[object, list[int]] = {}
        for index, request in enumerate(requests):
            sampling = request.sampling
            if request.tools or request.tool_choice != "auto" or request.role != "user" or (
                    request.image is None and self.sees_images):
                # tool requests plan their own prompts, and a VLM's text-only rows have no image slot to align
                answers[index] = "".join(self.chat_stream(
                    request.image, request.question, request.history, sampling, usages[index], role=request.role,
                    tools=request.tools, tool_choice=request.tool_choice))
            elif sampling.temperature == 0:  # greedy answers ignore the seed, so any seeds can share a batch
                groups.setdefault(replace(sampling, seed=0), []).append(index)
            else:  # a sampled row's draws depend on its place in a batch; alone, its answer depends on its seed only
                groups[index] = [index]
        for indices in groups.values():
            texts = self.chat_model.answer_batch(
                [requests[i].image for i in indices],
                [self._turns("user", requests[i].question, requests[i].history) for i in indices],
                requests[indices[0]].sampling,
                usages=[usages[i] for i in indices],
            )
            for index, text in zip(indices, texts):
                answers[index] = text
        return answers

    def ground(self, image: Image.Image, question: str, sampling: Sampling = Sampling()) -> GroundedAnswer:
        return GroundedAnswer.parse(self.chat(image, question, sampling=sampling), image)

    def caption_batch(self, images: Sequence[Image.Image], grounded: bool = False,
                      sampling: Sampling = Sampling()) -> list[GroundedAnswer]:
        prompt = self.grounded_caption_prompt if grounded else self.caption_prompt
        texts = self.chat_model.answer_batch(list(images), [[("user", prompt)]] * len(images), sampling)
        return [GroundedAnswer.parse(text, image) for text, image in zip(texts, images)]

    # --- generation ----------------------------------------------------------------------------------------------

    @property
    def draw_sizes(self) -> list[tuple[int, int]]:
        """(height, width) pairs the painter can produce, the default first; none without a painter."""
        return list(self.painter.sizes) if self.painter is not None else []

    @property
    def draw_defaults(self) -> tuple[int, float]:
        """The painter's own (base-stage steps, guidance scale), for forms that show them."""
        return self.painter.config.base_steps, self.painter.config.guidance_scale

    def draw(self, prompt: str, negative_prompt: str = "", size: tuple[int, int] | None = None,
             steps: int | None = None, guidance_scale: float | None = None, num_images: int = 1, seed: int = 0,
             progress: Callable[[int, int], None] | None = None) -> Drawing:
        """Text -> base and relay images. `progress(step, total)` is called after each denoiser step."""
        if self.painter is None:
            raise EngineError(f"The model '{self.name}' has no text-to-image stage; load a suite with diffusion/.")
        if not prompt.strip():
            raise EngineError("The prompt is empty; describe the picture to draw.")
        height, width = size or self.draw_sizes[0]
        if (height, width) not in self.draw_sizes:
            sizes = ", ".join(f"{w}x{h}" for h, w in self.draw_sizes)
            raise EngineError(f"Size {width}x{height} is not available; this model draws {sizes}.")
        if not 1 <= num_images <= 8:
            raise EngineError(f"Between 1 and 8 images can be drawn at once, not {num_images}.")
        result = self.painter(
            prompt=prompt, negative_prompt=negative_prompt, height=height, width=width, num_inference_steps=steps,
            guidance_scale=guidance_scale, num_images_per_prompt=num_images, seed=seed, callback=progress,
        )
        return Drawing(prompt=prompt, seed=seed, base=list(result.base), relay=list(result.relay))

    # --- the EmojiScenes world -----------------------------------------------------------------------------------

    def scene(self, seed: int) -> Image.Image:
        """A rendered EmojiScenes scene: an image the embedded models know how to talk about."""
        if self.scene_maker is None:
            raise EngineError("This engine has no scene maker.")
        return self.scene_maker(seed)

    # --- conversations -------------------------------------------------------------------------------------------

    def _turns(self, role: str, question: str, history: Sequence[Turn]) -> list[Turn]:
        """The conversation for the chat model; a VLM drops system messages (it was trained without them)."""
        if role == "user" and not question.strip():
            raise EngineError("The question is empty; ask something.")
        roles = ("system", "user", "assistant") if self.sees_images else ("system", "user", "assistant", "observation")
        for turn_role, _ in [*history, (role, question)]:
            if turn_role not in roles:
                raise EngineError(f"A conversation turn has the role '{turn_role}'; this model knows "
                                  f"{', '.join(roles)}.")
        turns = [*history, (role, question)]
        return [turn for turn in turns if turn[0] != "system"] if self.sees_images else turns


def _chat_only_family(folder: Path) -> str | None:
    """"glm4v" for a GLM-4.1V / 4.6V transformers folder; "glm" for a GLM text model's (our native GLM, ChatGLM3 /
    GLM-4 chat, transformers' GlmForCausalLM); None for anything else (a suite or VLM folder)."""
    config = folder / "config.json"
    values = json.loads(config.read_text()) if config.exists() else {}
    if values.get("model_type") in ("glm4v", "glm46v"):
        return "glm4v"
    text = values.get("kind") == "glm" or (values.get("model_type") in ("chatglm", "glm")
                                             and "vision_config" not in values)
    return "glm" if text else None


def painter_tokenizer_path(pipeline_folder: Path) -> Path | None:
    """The tokenizer file a relay pipeline folder records for its prompts (the one its DiTs were trained on, which
    may cut Chinese text differently from the chat model's), or None where it records none."""
    from diffusion.pipeline import PIPELINE_KIND
    from multimodal.checkpoint import read_native_config

    recorded = read_native_config(pipeline_folder, kind=PIPELINE_KIND).get("text_encoder", {}).get("tokenizer")
    if recorded is None:
        return None
    if not (pipeline_folder / recorded).exists():
        raise EngineError(f"The text-to-image model in {pipeline_folder} reads prompts with {recorded}, which is "
                          f"missing; copy the suite's tokenizer.json back beside it.")
    return pipeline_folder / recorded


class _Loading:
    """How `Engine.load` reads each model: quantized as asked, and sharded over the ranks under --tp."""

    def __init__(self, quant: str, group_size: int, exclude: tuple[str, ...], device: str, dtype: torch.dtype,
                 tp: int):
        from multimodal.quantize import QuantSpec  # imports the kernels: only when a model is loaded

        if quant not in ("none", "int8", "int4"):
            raise EngineError(f"Unknown quantization '{quant}'; use none, int8 or int4.")
        self.quant, self.group_size, self.exclude, self.dtype = quant, group_size, exclude, dtype
        self.spec = None if quant == "none" else QuantSpec(quant, group_size, exclude)  # checks the group size
        self.rank, self.world, self.device = 0, 1, torch.device(device)
        if tp > 1:
            from multimodal.tp import maybe_init_distributed

            context = maybe_init_distributed(tp, device)  # outside torchrun: one sentence with the command to run
            self.rank, self.world, self.device = context.rank, context.world, context.device

    def keep_text_encoder_in_float(self, vlm_folder: Path) -> None:
        """INT4 of a suite: the GLM layers the painter reads as its frozen text encoder stay in float (their INT4
        rounding moves the text states the DiTs were trained on: on 200 val prompts it cost drawing 13 points of
        presence, where INT4 of the DiTs alone cost 4.5). INT8 leaves drawing where float has it."""
        from multimodal.checkpoint import read_native_config
        from multimodal.quantize import QuantSpec
        from vlm.convert import KIND, read_raw_config
        from vlm.model import VLMConfig

        if self.quant != "int4" or read_raw_config(vlm_folder).get("kind") != KIND:
            return
        text = VLMConfig.from_dict(read_native_config(vlm_folder, kind=KIND)).text
        self.exclude = self.exclude + tuple(f"layers.{index}.*" for index in range(text.encoder_layers))
        self.spec = QuantSpec(self.quant, self.group_size, self.exclude)

    def decode_ready(self, model):
        """The model, with its INT8 and INT4 layers in the blocked layouts where the CPU has AVX512_VNNI
        (`glm/cpu_linears.py`) and each CPU decode step of up to 4 rows in one C call where its layers allow
        (`glm/cpu_decode.py`); not for tensor-parallel shards."""
        if self.world == 1 and self.device.type == "cpu":
            from glm.cpu_decode import prepare_cpu_decode
            from glm.cpu_linears import block_for_cpu

            prepare_cpu_decode(block_for_cpu(model))
        return model

    def quantize_shard(self, linear: torch.nn.Linear, name: str) -> torch.nn.Module:
        """One Linear after the tensor-parallel cut: quantized, or kept in float when `exclude` names it or (INT4)
        when the group size does not divide its input features (with a warning naming it)."""
        from fnmatch import fnmatchcase

        from multimodal.quantize import fits, quantize_linear, warn_kept_in_float

        if any(fnmatchcase(name, pattern) for pattern in self.exclude):
            return linear
        if not fits(linear, self.spec):
            warn_kept_in_float([(name, linear)], self.spec)
            return linear
        return quantize_linear(linear, self.spec, name)

    def _sharded(self, source, build_fn) -> torch.nn.Module:
        from multimodal.tp import load_sharded

        quantize = None if self.spec is None else self.quantize_shard
        model = load_sharded(source, build_fn, self.rank, self.world, dtype=self.dtype, device=self.device,
                             quantize=quantize)
        return model.to(self.device).eval()

    def vlm(self, folder: Path):
        from multimodal.checkpoint import read_native_config
        from vlm.convert import KIND, load_vlm, read_raw_config, read_vlm_checkpoint
        from vlm.model import VisionLanguageModel, VLMConfig

        if self.world == 1:
            return load_vlm(folder, self.dtype, self.device, quant=self.quant, group_size=self.group_size,
                            exclude=self.exclude)
        if read_raw_config(folder).get("kind") == KIND:  # native: each rank reads only its slices from disk
            config = VLMConfig.from_dict(read_native_config(folder, kind=KIND))
            return self._sharded(folder, lambda: VisionLanguageModel(config))
        config, state, _ = read_vlm_checkpoint(folder)  # a foreign format is converted in memory, then cut
        return self._sharded(state, lambda: VisionLanguageModel(config))

    def glm(self, folder: Path):
        from glm.convert import build_glm, is_encoder_only, load_glm, read_glm_checkpoint
        from multimodal.checkpoint import read_native_config
        from vlm.convert import read_raw_config

        if self.world == 1:
            return load_glm(folder, self.dtype, self.device, quant=self.quant, group_size=self.group_size,
                            exclude=self.exclude)
        raw = read_raw_config(folder)
        if raw.get("kind") == "glm":  # native: each rank reads only its slices from disk
            from glm.model import GLMConfig

            config = GLMConfig.from_dict(read_native_config(folder, kind="glm"))
            return self._sharded(folder, lambda: build_glm(config, is_encoder_only("native", raw)))
        config, state, detected = read_glm_checkpoint(folder)  # a foreign format is converted in memory, then cut
        return self._sharded(state, lambda: build_glm(config, is_encoder_only(detected, raw)))

    def glm4v(self, folder: Path):
        """A GLM-4.1V / 4.6V transformers folder: converted in memory, then cut and quantized as any model."""
        from vlm.glm4v import Glm4vModel, read_glm4v_checkpoint

        config, state = read_glm4v_checkpoint(folder)
        return self._sharded(state, lambda: Glm4vModel(config))

    def painter(self, folder: Path, text_encoder):
        """The relay pipeline of a pipeline folder (native DiTs in base/ and relay/) around `text_encoder`."""
        from diffusion.denoiser import DiT, DiTConfig
        from diffusion.pipeline import DIT_KIND, PIPELINE_KIND, RelayConfig, RelayPipeline
        from multimodal.checkpoint import read_native_config

        values = read_native_config(folder, kind=PIPELINE_KIND)
        denoisers = []
        for stage in ("base", "relay"):
            config = DiTConfig.from_dict(read_native_config(folder / stage, kind=DIT_KIND))
            denoisers.append(self._sharded(folder / stage, lambda config=config: DiT(config)))
        return RelayPipeline(text_encoder, *denoisers, RelayConfig.from_dict(values))
