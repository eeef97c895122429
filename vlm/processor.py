"""Prompts -> model inputs: templates, token types, position ids, batch layout, image tensors.

One image per conversation, placed where the template says (after BOS for CogVLM/CogVLM2, inside the first user turn
for GLM-4V and the suite's model). The image occupies `n` slots: boi, the patches, eoi (`n` from the model config);
their ids are placeholders that the model replaces with image embeddings.

Token types: the image slots are VISION, everything else LANGUAGE. Position ids (CogVLM's `build_position_ids`): text
counts up, boi gets the next position, every patch shares the one after, eoi the next, and the text continues from
there: `[L, V x (n), L...]` -> `0, 1, 2, 2, ..., 2, 3, 4, ...`. Padding does not advance positions.

Batch layout: `[left pad, prefix, image, pad, text]`, so every row's image starts at the same index (routing stays one
slice) and every row ends at the last column (decode writes one cache slot for all rows). Since padding is masked and
does not advance positions, each row computes exactly what it computes alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from multimodal.image import ImageSource, load_image, to_tensor
from vlm.model import LANGUAGE, VISION, VLMConfig

IMAGE = object()  # marks the image's place in a template's pieces
Turn = tuple[str, str]  # (question, answer)

# CogVLM grounding-generalist's prompts (used with the base template).
GROUNDED_CAPTION_PROMPT = "Can you provide a description of the image and include the coordinates [[x0,y0,x1,y1]] " \
                          "for each mentioned object?"
REFER_PROMPT = "Where is {}? answer in [[x0,y0,x1,y1]] format."


@dataclass(frozen=True)
class Special:
    """A special token, looked up by name in the tokenizer."""

    name: str


def _cogvlm_text(query: str, history: Sequence[Turn], answer_format: str) -> str:
    past = "".join(f"Question: {q} {answer_format} {a}\n" for q, a in history)
    return f"{past}Question: {query} {answer_format}"


def _glm_chat(query: str, history: Sequence[Turn], trailing_newline: bool) -> list:
    """GLM-4 chat: `[gMASK]<sop><|user|>\\n{image}{q}<|assistant|>\\n{a}<|user|>\\n{q}<|assistant|>`. THUDM's
    glm-4v tokenizer ends the generation prompt at `<|assistant|>`; the suite's own model was trained with a
    "\\n" after it (`trailing_newline`)."""
    turns = [*history, (query, None)]
    pieces: list = [Special("[gMASK]"), Special("<sop>")]
    for index, (question, answer) in enumerate(turns):
        pieces += [Special("<|user|>"), "\n"]
        if index == 0:
            pieces.append(IMAGE)
        pieces += [question, Special("<|assistant|>")]
        if answer is not None:
            pieces += ["\n", answer]
    if trailing_newline:
        pieces.append("\n")
    return pieces


def template_pieces(template: str, query: str, history: Sequence[Turn] = ()) -> list:
    """The prompt as pieces: text strings, `Special` tokens and the `IMAGE` marker."""
    if template == "cogvlm-base":
        if history:
            raise ValueError("The base template has no conversation history; use a chat template.")
        return [Special("<s>"), IMAGE, query]
    if template in ("cogvlm-chat", "cogvlm2-chat"):
        return [Special("<s>" if template == "cogvlm-chat" else "<|begin_of_text|>"), IMAGE,
                _cogvlm_text(query, history, "Answer:")]
    if template in ("cogvlm-vqa", "cogvlm2-vqa"):
        return [Special("<s>" if template == "cogvlm-vqa" else "<|begin_of_text|>"), IMAGE,
                _cogvlm_text(query, history, "Short answer:")]
    if template in ("glm-4v", "suite"):
        return _glm_chat(query, history, trailing_newline=template == "suite")
    raise ValueError(f"Unknown prompt template '{template}'; use one of {', '.join(TEMPLATES)}.")


TEMPLATES = ("cogvlm-base", "cogvlm-chat", "cogvlm-vqa", "cogvlm2-chat", "cogvlm2-vqa", "glm-4v", "suite")


@dataclass
class VLMInputs:
    input_ids: torch.Tensor  # [B, T] (image slots hold a placeholder id)
    token_types: torch.Tensor  # [B, T] LANGUAGE / VISION
    attention_mask: torch.Tensor  # [B, T] bool, False for padding
    positions: torch.Tensor  # [B, T]
    pixels: torch.Tensor | None  # [B, 3, S, S]
    image_start: int | None  # index of boi in every row
    image_tokens: int  # n = boi + patches + eoi
    image_sizes: list[tuple[int, int]]  # original (width, height) per row, for mapping boxes back

    @property
    def padded(self) -> bool:
        return not bool(self.attention_mask.all())

    def to(self, device) -> VLMInputs:
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return VLMInputs(move(self.input_ids), move(self.token_types), move(self.attention_mask),
                         move(self.positions), move(self.pixels), self.image_start, self.image_tokens,
                         self.image_sizes)


def position_ids(token_types: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Positions [B, T] from token types [B, T]: patches share one position; boi and eoi get their own; padding
    (attention_mask False) does not advance the count (pads themselves get position 0)."""
    batch, length = token_types.shape
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.bool, device=token_types.device)
    positions = torch.zeros(batch, length, dtype=torch.long, device=token_types.device)
    for row in range(batch):
        keep = attention_mask[row].bool().nonzero().squeeze(1)  # real tokens, in order
        vision = token_types[row, keep] == VISION
        previous = F.pad(vision[:-1], (1, 0), value=False)
        following = F.pad(vision[1:], (0, 1), value=False)
        patch = vision & previous & following  # vision tokens that are neither boi nor eoi
        first_patch = patch & ~F.pad(patch[:-1], (1, 0), value=False)
        advance = ~patch | first_patch
        advance[:1] = False  # the first real token is position 0
        positions[row, keep] = advance.long().cumsum(0)
    return positions


def vision_expert_span(image_start: int, image_tokens: int) -> tuple[int, int]:
    """Token slice routed to the vision expert: boi and the patches; eoi (the last vision token) is language."""
    return image_start, image_start + image_tokens - 1


class Processor:
    """Builds model inputs from (image, question, history) with a tokenizer and a VLM config.

    The tokenizer needs `encode(text) -> list[int]` (no special tokens added), `decode(ids) -> str` and
    `token_id(name) -> int` for special tokens, raising ValueError for unknown ones (as `glm.tokenizer.GLMTokenizer`).
    """

    def __init__(self, tokenizer, config: VLMConfig, template: str | None = None, pad_id: int = 0):
        self.tokenizer = tokenizer
        self.config = config
        self.template = template or config.template
        if self.template not in TEMPLATES:
            raise ValueError(f"Unknown prompt template '{self.template}'; use one of {', '.join(TEMPLATES)}.")
        self.pad_id = pad_id

    def special_id(self, name: str) -> int:
        try:
            return self.tokenizer.token_id(name)
        except ValueError:
            message = f"The tokenizer has no special token {name!r}; the '{self.template}' template needs it."
            raise ValueError(message) from None

    def prompt_ids(self, query: str, history: Sequence[Turn] = (), with_image: bool = True) -> tuple[list, list]:
        """Token ids before and after the image for one conversation."""
        before: list[int] = []
        after: list[int] = []
        seen_image = False
        for piece in template_pieces(self.template, query, history):
            target = after if seen_image else before
            if piece is IMAGE:
                seen_image = True
            elif isinstance(piece, Special):
                target.append(self.special_id(piece.name))
            elif piece:
                target.extend(self.tokenizer.encode(piece))
        if not with_image:
            return before + after, []
        return before, after

    def image_tensor(self, image: ImageSource) -> tuple[torch.Tensor, tuple[int, int]]:
        picture = load_image(image)
        vision = self.config.vision
        return to_tensor(picture, vision.image_size, vision.mean, vision.std), picture.size

    def __call__(
        self,
        queries: str | Sequence[str],
        images: ImageSource | Sequence[ImageSource] | None = None,
        histories: Sequence[Sequence[Turn]] | None = None,
        answers: Sequence[str] | None = None,
    ) -> VLMInputs:
        """Batch of conversations -> `VLMInputs`. `answers` (for training) are appended after the prompt."""
        if isinstance(queries, str):
            queries = [queries]
            images = None if images is None else [images]
            histories = None if histories is None else [histories]
        histories = histories or [()] * len(queries)
        if images is not None and len(images) != len(queries):
            raise ValueError(f"Got {len(images)} images for {len(queries)} questions; give one image per question.")
        rows = []
        for index, (query, history) in enumerate(zip(queries, histories)):
            before, after = self.prompt_ids(query, history, with_image=images is not None)
            if answers is not None:
                after = after + self.tokenizer.encode(answers[index])
            rows.append((before, after))
        pixels, sizes = None, []
        if images is not None:
            tensors = [self.image_tensor(image) for image in images]
            pixels = torch.stack([t for t, _ in tensors])  # [B, 3, S, S]
            sizes = [size for _, size in tensors]
        return self.layout(rows, self.config.image_tokens if images is not None else 0, pixels, sizes)

    def layout(self, rows: Sequence[tuple[list, list]], image_tokens: int, pixels=None, sizes=()) -> VLMInputs:
        """[left pad, before, image, pad, after] per row; with no image (image_tokens 0) plain left padding."""
        prefix = max(len(before) for before, _ in rows)
        suffix = max(len(after) for _, after in rows)
        length = prefix + image_tokens + suffix
        if length > self.config.text.max_seq_len:
            raise ValueError(f"The prompt needs {length} tokens, more than the model's context of "
                             f"{self.config.text.max_seq_len}.")
        batch = len(rows)
        ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        types = torch.full((batch, length), LANGUAGE, dtype=torch.long)
        mask = torch.zeros(batch, length, dtype=torch.bool)
        for row, (before, after) in enumerate(rows):
            ids[row, prefix - len(before):prefix] = torch.as_tensor(before, dtype=torch.long)
            mask[row, prefix - len(before):prefix + image_tokens] = True
            types[row, prefix:prefix + image_tokens] = VISION
            if after:
                ids[row, length - len(after):] = torch.as_tensor(after, dtype=torch.long)
                mask[row, length - len(after):] = True
        return VLMInputs(ids, types, mask, position_ids(types, mask), pixels, prefix if image_tokens else None,
                         image_tokens, list(sizes))
