"""The high-level VLM API: chat about an image (streaming), ground a question to pixel boxes, caption a batch.

`VLMChat(model, tokenizer)` wraps a `VisionLanguageModel` and a tokenizer. An image is encoded once and its
embeddings reused for every later turn about it (`Conversation`, or the one-entry cache behind `stream`). Turns are
(role, text) pairs, roles "user" and "assistant", the last one the user's question.

`load_chat(checkpoint)` reads a native VLM folder (`model.safetensors`, `config.json` of kind "vlm", and a
`tokenizer.json` / `tokenizer.model`), or a CogVLM / CogVLM2 / GLM-4V folder with its tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from glm.generate import SamplingConfig, TextDeltas
from glm.tokenizer import GLMTokenizer
from multimodal.image import ImageSource, load_image
from vlm.convert import load_vlm
from vlm.generate import generate, generate_tokens
from vlm.grounding import Grounding, parse_grounding, pixel_boxes
from vlm.model import VisionLanguageModel
from vlm.processor import GROUNDED_CAPTION_PROMPT, REFER_PROMPT, Processor, Turn

EMBEDDED = Path(__file__).resolve().parent.parent / "multimodal" / "assets" / "vlm"
RoleTurn = tuple[str, str]  # (role, text)


@dataclass
class Usage:
    """What one answer cost and why it ended, filled in by the generating call that is handed it."""

    prompt_tokens: int = 0  # image tokens included
    completion_tokens: int = 0  # the stop token excluded
    finish_reason: str = "stop"  # "length" when the token limit (or the context) cut the answer

    def record(self, prompt_tokens: int, answer_ids: Sequence[int], stopped: bool) -> None:
        self.prompt_tokens, self.completion_tokens = prompt_tokens, len(answer_ids)
        self.finish_reason = "stop" if stopped else "length"


def _pairs(turns: Sequence[RoleTurn]) -> tuple[str, list[Turn]]:
    """[(user, q1), (assistant, a1), ..., (user, q)] -> (q, [(q1, a1), ...])."""
    if not turns or turns[-1][0] != "user":
        raise ValueError("A conversation must end with the user's question.")
    history, question = [], None
    for role, text in turns[:-1]:
        if role == "user":
            question = text
        elif role == "assistant" and question is not None:
            history.append((question, text))
            question = None
        else:
            raise ValueError(f"Turns must alternate user and assistant; got an unexpected '{role}' turn.")
    return turns[-1][1], history


class Conversation:
    """One image, encoded once, and the turns so far."""

    def __init__(self, chat: VLMChat, image: ImageSource | None):
        self.chat = chat
        self.image = load_image(image) if image is not None else None
        self.embeds = chat.encode(self.image) if self.image is not None else None
        self.history: list[Turn] = []

    def ask(self, question: str, sampling: SamplingConfig | None = None) -> Iterator[str]:
        """Stream the answer's text deltas; the finished answer joins the history."""
        pieces = []
        for delta in self.chat.stream_pairs(self.image, self.embeds, question, self.history, sampling):
            pieces.append(delta)
            yield delta
        self.history.append((question, "".join(pieces)))


class VLMChat:
    def __init__(self, model: VisionLanguageModel, tokenizer, template: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = Processor(tokenizer, model.vlm_config, template, pad_id=getattr(tokenizer, "pad_id", 0))
        self._cached: tuple[Image.Image, torch.Tensor] | None = None

    def sampling(self, max_new_tokens=128, temperature=0.0, top_p=None, seed=0) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              stop_tokens=tuple(getattr(self.tokenizer, "stop_tokens", ())))

    def _config(self, sampling) -> SamplingConfig:
        if sampling is None:
            return self.sampling()
        if isinstance(sampling, SamplingConfig):
            return sampling
        return self.sampling(sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.seed)

    @torch.inference_mode()
    def encode(self, image: Image.Image) -> torch.Tensor:
        """Image embeddings [1, n, hidden]; computed once per image and reused across turns."""
        pixels, _ = self.processor.image_tensor(image)
        return self.model.encode_image(pixels[None].to(self.model.device))

    def start(self, image: ImageSource | None) -> Conversation:
        return Conversation(self, image)

    def stream_pairs(self, image, embeds, question: str, history: Sequence[Turn], sampling=None,
                     usage: Usage | None = None) -> Iterator[str]:
        inputs = self.processor([question], None if image is None else [image], [history])
        deltas = TextDeltas(self.tokenizer.decode)
        stopped = False
        for step in generate_tokens(self.model, inputs, self._config(sampling), embeds):
            if step[0] is None:
                stopped = True
                break
            if delta := deltas.push(step[0]):
                yield delta
        if usage is not None:
            usage.record(int(inputs.attention_mask[0].sum()), deltas.tokens, stopped)
        if delta := deltas.flush():
            yield delta

    def stream(self, image: Image.Image | None, turns: Sequence[RoleTurn], sampling=None,
               usage: Usage | None = None) -> Iterator[str]:
        """Text deltas of the answer to the last user turn; the last image's embeddings are reused."""
        question, history = _pairs(turns)
        embeds = None
        if image is not None:
            if self._cached is None or self._cached[0] is not image:
                self._cached = (image, self.encode(image))
            embeds = self._cached[1]
        return self.stream_pairs(image, embeds, question, history, sampling, usage)

    def answer(self, image: ImageSource | None, question: str, history: Sequence[Turn] = (), sampling=None) -> str:
        picture = load_image(image) if image is not None else None
        return "".join(self.stream_pairs(picture, None if picture is None else self.encode(picture), question,
                                         history, sampling))

    def answer_batch(self, images: Sequence, turns_list: Sequence[Sequence[RoleTurn]], sampling=None,
                     usages: Sequence[Usage] | None = None) -> list[str]:
        """One answer per (image, turns); the rows run as one padded batch. `usages`, one per row, are filled in."""
        pairs = [_pairs(turns) for turns in turns_list]
        inputs = self.processor([q for q, _ in pairs], list(images), [h for _, h in pairs])
        config = self._config(sampling)
        outputs = generate(self.model, inputs, config)
        for row, (usage, ids) in enumerate(zip(usages or (), outputs)):
            # A row that did not stop ran into the token limit (or the context) before a stop token.
            usage.record(int(inputs.attention_mask[row].sum()), ids, len(ids) < config.max_new_tokens)
        return [self.tokenizer.decode(ids) for ids in outputs]

    def caption(self, images: Sequence, prompt: str = "Describe the image.", sampling=None) -> list[str]:
        return self.answer_batch(images, [[("user", prompt)]] * len(images), sampling)

    def ground(self, image: ImageSource, question: str, sampling=None) -> tuple[str, Grounding, list]:
        """(answer text, parsed grounding, [(phrase, pixel box)]) with boxes in the original image's pixels."""
        picture = load_image(image)
        text = self.answer(picture, question, sampling=sampling)
        grounding = parse_grounding(text)
        return text, grounding, pixel_boxes(grounding, *picture.size)

    def grounded_caption(self, image: ImageSource, sampling=None):
        return self.ground(image, GROUNDED_CAPTION_PROMPT, sampling)

    def refer(self, image: ImageSource, expression: str, sampling=None):
        return self.ground(image, REFER_PROMPT.format(expression), sampling)


def load_chat(checkpoint: str | Path | None = None, device="cpu", dtype: torch.dtype | None = None) -> VLMChat:
    """The VLM of a checkpoint folder, or the embedded one when `checkpoint` is None."""
    folder = Path(checkpoint) if checkpoint is not None else EMBEDDED
    if checkpoint is None and not (folder / "config.json").exists():
        raise ValueError("The embedded VLM is not part of this package yet; pass --checkpoint FOLDER.")
    if not folder.exists():
        raise ValueError(f"Checkpoint folder {folder} does not exist.")
    tokenizer_folder = folder if folder.is_dir() else folder.parent
    model = load_vlm(folder, dtype=dtype, device=device)
    return VLMChat(model, GLMTokenizer.load(tokenizer_folder))
