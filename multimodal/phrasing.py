"""Many wordings of each question the world asks, in English and Chinese, with a held-out set per form.

A task is built in its form's canonical wording (the first training phrasing: "Where is the dog?"), and
`rephrase` words it again in any phrasing of a split: "train" (what training batches draw from) or "held-out"
(never trained on; `multimodal eval` reports them apart, to measure whether the model learned the task or the
sentence). Slots fill each phrasing: `{thing}` "the dog on the left", `{be}` "is"/"are", `{plural}` "dogs",
`{a_thing}` "a dog", `{name}` "dog", `{relation}` "to the left of", `{measure}` 只, `{direction}` 左边.

Follow-up forms ("And how many cats?", "What is it wearing?", "它在哪里？") refer back to the turn before them and
only make sense after it (`multimodal.language.follow_ups`).
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

SPLITS = ("train", "held-out")


@dataclass(frozen=True)
class Phrasings:
    train: tuple[str, ...]
    held_out: tuple[str, ...]

    def of(self, split: str) -> tuple[str, ...]:
        if split not in SPLITS:
            raise ValueError(f"Unknown phrasing split '{split}'; choose one of {', '.join(SPLITS)}.")
        return self.train if split == "train" else self.held_out


PHRASINGS: dict[str, dict[str, Phrasings]] = {
    "caption": {
        "en": Phrasings(
            ("Describe the image.", "What is in the image?", "What do you see?", "Describe this picture.",
             "What does the image show?", "Tell me what is in the picture.", "Caption this image.",
             "Write a short description of the image.", "Describe what you see.", "What is shown here?",
             "Please describe the picture.", "What's in this image?", "Give the image a caption.",
             "What is this picture of?", "Can you describe the image?", "Could you describe this picture?",
             "I'd like a description of the image.", "Explain what the picture shows.",
             "What are the contents of this image?", "Please caption the picture.", "What is going on in the image?",
             "Give me a description of this picture.", "Look at the image and describe it."),
            ("Briefly describe the scene.", "What can you see in this picture?", "Summarize the image."),
        ),
        "zh": Phrasings(
            ("描述这张图片。", "图片里有什么？", "你看到了什么？", "描述一下这幅图。", "这张图片展示了什么？",
             "告诉我图中有什么。", "给这张图片写一句描述。", "请描述图片内容。", "图中有哪些东西？", "说说这张图。",
             "这幅图里画了什么？", "请给图片配一句说明。", "用一句话描述这张图。", "这是一张什么样的图？",
             "你能描述一下这张图吗？", "我想知道图里有什么。", "请说说画面里有什么。", "帮我描述这幅画。",
             "看看这张图，说说内容。", "这幅图的内容是什么？", "图上画的是什么？", "请为这张图写个说明。",
             "讲讲这张图片。"),
            ("简单描述一下画面。", "这张图里都有什么？", "概括一下这张图片。"),
        ),
    },
    "grounded_caption": {
        "en": Phrasings(
            ("Describe the image with boxes.", "Describe the image and give the boxes of the objects.",
             "List the objects with their boxes.", "Caption the image with bounding boxes.",
             "Describe the picture and mark each object.", "Detect all objects.", "Find every object in the image.",
             "Locate all the objects.", "Describe the image, with a box for each object.",
             "Mark all the objects in the picture.", "Describe the image and locate each thing.",
             "Give a grounded caption of the image.", "What is where in the image?", "Show where each object is.",
             "Give every object in the image a box.", "Find all the things in the picture and box them.",
             "Please locate every object.", "Can you detect the objects in the image?",
             "Name each object and give its box.", "Which objects are there, and where?",
             "Label every object with a box.", "Put a box around each object."),
            ("List everything you see, with boxes.", "Describe the scene and box every object.",
             "Where is everything in the picture?"),
        ),
        "zh": Phrasings(
            ("描述这张图片并标出位置。", "描述图片并给出每个物体的框。", "列出图中的物体和它们的框。",
             "给图片写带框的描述。", "描述这幅图并标出每个东西。", "检测图中所有物体。", "找出图中的每个物体。",
             "标出所有物体的位置。", "描述图片，给每个物体一个框。", "框出图中所有的东西。",
             "描述画面并定位每个物体。", "图中什么东西在哪里？", "带位置地描述这张图。", "标出每个物体在哪里。",
             "给图中每样东西画个框。", "请定位图里的所有物体。", "你能检测出图中的物体吗？",
             "说出每个物体并给出它的框。", "图里有哪些东西，各在哪里？", "用框标出每个物体。",
             "帮我把所有物体都框出来。", "我想知道每个东西的位置。"),
            ("列出你看到的一切并标出框。", "描述画面并框出每个物体。", "图里的东西都在哪儿？"),
        ),
    },
    "refer": {
        "en": Phrasings(
            ("Where {be} {thing}?", "Find {thing}.", "Show me {thing}.", "Can you locate {thing}?",
             "Point to {thing}.", "Give the box of {thing}.", "Locate {thing}.", "Mark {thing}.",
             "Draw a box around {thing}.", "I'm looking for {thing}.", "Where in the picture {be} {thing}?",
             "Please point out {thing}.", "Box {thing}.", "Where can I see {thing}?", "Could you show me {thing}?",
             "Please find {thing}.", "Where exactly {be} {thing}?", "Give me the location of {thing}.",
             "Which region contains {thing}?", "Outline {thing}.", "Spot {thing}.",
             "Please locate {thing} in the image.", "Where do you see {thing}?", "I need the box of {thing}.",
             "Detect {thing}.", "Help me find {thing}.", "I want to know where {thing} {be}."),
            ("Can you find {thing}?", "Tell me where {thing} {be}.", "Highlight {thing}.",
             "Which part of the image shows {thing}?"),
        ),
        "zh": Phrasings(
            ("{thing}在哪里？", "请找出{thing}。", "{thing}在什么位置？", "找到{thing}。", "指出{thing}。",
             "框出{thing}。", "请标出{thing}的位置。", "帮我找一下{thing}。", "图中的{thing}在哪儿？",
             "请定位{thing}。", "给出{thing}的框。", "{thing}在哪儿？", "把{thing}框出来。", "哪里有{thing}？",
             "{thing}在图中哪里？", "请指出{thing}的位置。", "我想知道{thing}在哪里。", "你可以找出{thing}吗？",
             "帮我定位{thing}。", "{thing}在图片的哪个地方？", "请把{thing}标出来。", "找一找{thing}。",
             "{thing}的框是什么？", "请给出{thing}的位置。", "标出{thing}。", "{thing}在哪个位置？"),
            ("你能找到{thing}吗？", "告诉我{thing}在哪里。", "{thing}的位置是？", "圈出{thing}。"),
        ),
    },
    "count": {
        "en": Phrasings(
            ("How many {plural} are there?", "How many {plural} can you see?", "Count the {plural}.",
             "How many {plural} are in the image?", "What is the number of {plural}?",
             "How many {plural} does the picture show?", "Could you count the {plural}?",
             "I want to know how many {plural} there are.", "How many {plural} are in this picture?",
             "What number of {plural} can you see?", "Count how many {plural} there are.",
             "How many {plural} are shown?", "Please count the {plural}.", "How many {plural} are visible?",
             "Can you count the {plural} in the image?"),
            ("Tell me how many {plural} there are.", "How many {plural} do you see?"),
        ),
        "zh": Phrasings(
            ("图中有几{measure}{name}？", "有多少{measure}{name}？", "数一数{name}有几{measure}。",
             "图里能看到几{measure}{name}？", "{name}有几{measure}？", "图中{name}的数量是多少？",
             "请数一下{name}的数量。", "我想知道有几{measure}{name}。", "你能数出几{measure}{name}吗？",
             "这里有几{measure}{name}？", "画面里有几{measure}{name}？", "{name}的个数是多少？", "数数图中的{name}。",
             "图片中有多少{measure}{name}？", "能看到多少{measure}{name}？"),
            ("图片里一共有几{measure}{name}？", "你看到几{measure}{name}？"),
        ),
    },
    "presence": {
        "en": Phrasings(
            ("Is there {a_thing}?", "Is there {a_thing} in the image?", "Do you see {a_thing}?",
             "Does the picture have {a_thing}?", "Can you see {a_thing}?", "Is there {a_thing} in this picture?",
             "Is there {a_thing} here?", "Do you see {a_thing} in the picture?", "Does the image show {a_thing}?",
             "I want to know if there is {a_thing}.", "Is there {a_thing} anywhere?",
             "Does this picture include {a_thing}?", "Is there {a_thing} in the scene?",
             "Has the picture got {a_thing}?"),
            ("Does the image contain {a_thing}?", "Is {a_thing} in the picture?"),
        ),
        "zh": Phrasings(
            ("图中有{name}吗？", "图片里有{name}吗？", "你看到{name}了吗？", "这张图里有没有{name}？",
             "能看到{name}吗？", "画面中有{name}吗？", "画面里是否出现了{name}？", "我想知道图中是否有{name}。",
             "这幅图里有{name}吗？", "你能看到{name}吗？", "图上有{name}吗？", "{name}在图中出现了吗？",
             "有{name}吗？", "图片中可以看到{name}吗？"),
            ("图里是否有{name}？", "有没有{name}？"),
        ),
    },
    "background": {
        "en": Phrasings(
            ("What colour is the background?", "What is the background colour?", "What color is the background?",
             "Which colour is the background?", "Name the background colour.", "The background is what colour?",
             "What's the background colour?", "Which color is the background?",
             "What colour is the picture's background?", "I want to know the background colour.",
             "What colour is the backdrop?", "What colour is the background of the image?",
             "Can you name the background colour?", "The background colour is?"),
            ("What colour is behind the objects?", "Tell me the colour of the background."),
        ),
        "zh": Phrasings(
            ("背景是什么颜色？", "背景的颜色是什么？", "背景是什么色的？", "图片背景是什么颜色？", "说出背景的颜色。",
             "底色是什么颜色？", "背景是哪种颜色？", "画面的背景是什么颜色？", "我想知道背景的颜色。",
             "你能说出背景颜色吗？", "背景色是什么？", "这幅图的底色是什么？", "图的背景是啥颜色？"),
            ("这张图的背景颜色是？", "背景用的是什么颜色？"),
        ),
    },
    "neighbour": {
        "en": Phrasings(
            ("What is {relation} the {name}?", "What is {relation} the {name} in the image?",
             "Which object is {relation} the {name}?", "Name the object {relation} the {name}.",
             "What do you see {relation} the {name}?", "What's {relation} the {name}?",
             "Which thing is {relation} the {name}?", "What lies {relation} the {name}?",
             "I want to know what is {relation} the {name}.", "Can you name what is {relation} the {name}?",
             "What object do you see {relation} the {name}?", "What is placed {relation} the {name}?",
             "Look {relation} the {name}: what is there?"),
            ("Tell me what is {relation} the {name}.", "What can be found {relation} the {name}?"),
        ),
        "zh": Phrasings(
            ("{name}的{direction}是什么？", "{name}的{direction}有什么？", "在{name}{direction}的是什么？",
             "{name}{direction}是什么东西？", "说出{name}{direction}的物体。", "{name}的{direction}是哪个物体？",
             "{name}{direction}有什么东西？", "我想知道{name}的{direction}是什么。",
             "你能说出{name}{direction}是什么吗？", "在{name}的{direction}有什么？",
             "看看{name}的{direction}，那里是什么？", "{name}{direction}放着什么？"),
            ("{name}{direction}的东西是什么？", "告诉我{name}的{direction}是什么。"),
        ),
    },
    "wearing": {
        "en": Phrasings(
            ("What is the {name} wearing?", "What does the {name} wear?", "What is on the {name}'s head?",
             "What has the {name} got on?", "Is the {name} wearing anything? What?", "What is the {name} dressed in?",
             "Which accessory does the {name} wear?", "I want to know what the {name} is wearing.",
             "Can you tell what the {name} wears?", "What is the {name} wearing in the picture?",
             "What is the {name} wearing, if anything?", "Name what the {name} is wearing.",
             "What accessory is on the {name}?"),
            ("Tell me what the {name} is wearing.", "What does the {name} have on?"),
        ),
        "zh": Phrasings(
            ("{name}戴着什么？", "{name}戴了什么？", "{name}头上戴着什么？", "{name}身上戴的是什么？",
             "{name}戴着什么东西？", "说出{name}戴的东西。", "我想知道{name}戴着什么。", "你能看出{name}戴着什么吗？",
             "{name}身上有什么配饰？", "{name}头上有什么？", "请说出{name}戴着的东西。", "{name}穿戴了什么？",
             "图中的{name}戴着什么？"),
            ("{name}戴的是什么？", "告诉我{name}戴着什么。"),
        ),
    },
    "size": {
        "en": Phrasings(
            ("Is the {name} big or small?", "Is the {name} small or big?", "How big is the {name}?",
             "Is the {name} large or small?", "What size is the {name}?", "Big or small: the {name}?",
             "How large is the {name}?", "Big or small, which is the {name}?",
             "I want to know if the {name} is big or small.", "Can you tell if the {name} is big or small?",
             "Tell whether the {name} is big or small.", "Is the {name} a big one or a small one?",
             "What is the size of the {name}?"),
            ("Would you say the {name} is big or small?", "Is the {name} drawn big or small?"),
        ),
        "zh": Phrasings(
            ("{name}是大还是小？", "{name}是小还是大？", "{name}有多大？", "{name}大不大？", "{name}的大小是？",
             "{name}画得大还是小？", "{name}是大的还是小的？", "我想知道{name}是大还是小。",
             "你能看出{name}是大是小吗？", "{name}的尺寸是大还是小？", "{name}画得大不大？", "请说出{name}的大小。",
             "{name}个头大还是小？"),
            ("{name}算大还是算小？", "你觉得{name}是大是小？"),
        ),
    },
    # Follow-ups: asked right after a question about the same object or class.
    "count_again": {
        "en": Phrasings(
            ("And how many {plural}?", "What about {plural}?", "And {plural}?"),
            ("How about {plural}?",),
        ),
        "zh": Phrasings(
            ("那{name}呢？", "{name}呢？", "那{name}有几{measure}？"),
            ("{name}又有几{measure}？",),
        ),
    },
    "where_it": {
        "en": Phrasings(
            ("Where {be} {pronoun}?", "Show me {pronoun}.", "Find {pronoun}."),
            ("Can you point to {pronoun}?",),
        ),
        "zh": Phrasings(
            ("{pronoun}在哪里？", "{pronoun}在哪儿？", "把{pronoun}框出来。"),
            ("{pronoun}在什么位置？",),
        ),
    },
    "it_wearing": {
        "en": Phrasings(
            ("What is it wearing?", "What does it wear?", "And what is it wearing?"),
            ("What has it got on?",),
        ),
        "zh": Phrasings(
            ("它戴着什么？", "它戴了什么？", "那它戴着什么？"),
            ("它头上是什么？",),
        ),
    },
    "it_size": {
        "en": Phrasings(
            ("Is it big or small?", "How big is it?", "And is it big or small?"),
            ("Is it large or small?",),
        ),
        "zh": Phrasings(
            ("它是大还是小？", "它大不大？", "那它是大还是小？"),
            ("它有多大？",),
        ),
    },
}

# Perturbed wordings: a training phrasing with edits that keep its slots, so that the model learns to read a
# question it has never seen word for word (the held-out phrasings) from its content words rather than its frame.
WRAPPERS = {
    "en": (("Please, ", "Hey, ", "Okay, ", "Quick question: ", "Look at the picture. ", "One more thing: ", "So, "),
           (" Thanks.", " Please.", " Thank you!", " Quickly.")),
    "zh": (("请问，", "麻烦你，", "看这张图，", "问一下，", "你好，", "那么，"), ("谢谢。", "谢谢！", "麻烦了。")),
}
EDIT_COUNTS = ((1, 0.5), (2, 0.3), (3, 0.2))  # (edits, weight): a held-out wording is often several edits away
SPLICE_SHARE = 0.3  # edited wordings that start by joining two phrasings of the form
CJK = (0x4E00, 0x9FA5)  # the unified ideographs: most are unknown to the world's tokenizer
SLOT = re.compile(r"(\{[a-z_]+\})")


def _pieces(template: str, lang: str) -> list[str]:
    """The template cut into slots and words (en) or characters (zh); punctuation and spaces stay pieces."""
    pieces = []
    for part in SLOT.split(template):
        if SLOT.fullmatch(part) or not part:
            pieces += [part] if part else []
        else:
            pieces += re.findall(r"\w+|\W", part) if lang == "en" else list(part)
    return pieces


def _is_word(piece: str) -> bool:
    return not SLOT.fullmatch(piece) and piece.isalnum()


@functools.cache
def _question_words(lang: str) -> tuple[str, ...]:
    return tuple(p.lower() for form in PHRASINGS.values() for t in form[lang].train for p in _pieces(t, lang)
                 if _is_word(p))


def _filler(lang: str, rng: random.Random) -> str:
    """A word the edit puts in: one of the language's own question words, or one the world never uses (in Chinese
    a run of one to three characters: an unknown verb is mostly two)."""
    if rng.random() < 0.5:
        return rng.choice(_question_words(lang))
    if lang == "zh":
        return "".join(chr(rng.randint(*CJK)) for _ in range(rng.choices((1, 2, 3), weights=(0.4, 0.4, 0.2))[0]))
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))


def perturb(template: str, lang: str, rng: random.Random) -> str:
    """`template` with one edit: a polite or context wrapper, or a word (en) or characters (zh) inserted, replaced
    or dropped; slots and punctuation are never touched."""
    edit = rng.choices(("wrap", "insert", "replace", "drop"), weights=(0.35, 0.3, 0.2, 0.15))[0]
    if edit == "wrap":
        prefixes, suffixes = WRAPPERS[lang]
        if rng.random() < 0.5:
            prefix = rng.choice(prefixes)
            keep = prefix.endswith((". ", ": ")) or template.startswith(("I ", "I'", "{"))
            return prefix + (template if keep else template[:1].lower() + template[1:])
        return template + rng.choice(suffixes)
    pieces = _pieces(template, lang)
    words = [index for index, piece in enumerate(pieces) if _is_word(piece)]
    if edit == "drop" and len(words) < 2:
        edit = "insert"
    if edit == "insert" and words:  # before a word, or after the last one
        index = rng.choice(words + [words[-1] + 1])
        space = " " if lang == "en" else ""
        if index == 0 and lang == "en" and pieces[0] != "I":
            pieces[0] = pieces[0].lower()
        pieces.insert(index, _filler(lang, rng) + space if index in words else space + _filler(lang, rng))
    elif edit == "insert":
        pieces.insert(0, _filler(lang, rng) + (" " if lang == "en" else ""))
    elif edit == "replace" and words:
        index = rng.choice(words)
        pieces[index] = next(word for word in iter(lambda: _filler(lang, rng), None)
                             if word.lower() != pieces[index].lower())
    elif edit == "drop":
        index = rng.choice(words)
        pieces[index] = ""
        if lang == "en" and index + 1 < len(pieces) and pieces[index + 1] == " ":
            pieces[index + 1] = ""
    text = "".join(pieces)
    return text[:1].upper() + text[1:] if lang == "en" else text


def splice(first: str, second: str, lang: str, rng: random.Random) -> str:
    """The head of `first` joined to the tail of `second`, two phrasings of one form: cut at a shared slot when both
    name the same slots in the same order ("Where is {thing}" + "{thing} in the image?"), else at any word boundary
    of a phrasing without slots; `first` unchanged where the two cannot be joined."""
    first_pieces, second_pieces = _pieces(first, lang), _pieces(second, lang)
    slots = [piece for piece in first_pieces if SLOT.fullmatch(piece)]
    if slots != [piece for piece in second_pieces if SLOT.fullmatch(piece)]:
        return first
    if slots:
        k = rng.randrange(len(slots))
        cut_first = [i for i, piece in enumerate(first_pieces) if SLOT.fullmatch(piece)][k] + 1
        cut_second = [i for i, piece in enumerate(second_pieces) if SLOT.fullmatch(piece)][k] + 1
    else:
        first_words = [i for i, piece in enumerate(first_pieces) if _is_word(piece)]
        second_words = [i for i, piece in enumerate(second_pieces) if _is_word(piece)]
        cut_first = rng.choice(first_words[1:] or [len(first_pieces)])
        cut_second = rng.choice(second_words[1:] or [0])
    tail = "".join(second_pieces[cut_second:])
    head = "".join(first_pieces[:cut_first])
    if lang == "en" and head and tail and not head.endswith(" ") and tail[0].isalnum():
        head += " "
    text = head + (tail[:1].lower() + tail[1:] if lang == "en" and head and not tail.startswith("I") else tail)
    return text or first


def perturbed_phrase(form: str, lang: str, slots: dict[str, str], rng: random.Random) -> str:
    """A training phrasing of `form` edited one to three times (`EDIT_COUNTS`): with `SPLICE_SHARE` the first edit
    joins it to another of its form's training phrasings (`splice`), the others are `perturb` edits; slots filled
    in, never a held-out sentence."""
    train = PHRASINGS[form][lang].train
    while True:
        template, edits = rng.choice(train), rng.choices(*zip(*EDIT_COUNTS))[0]
        if rng.random() < SPLICE_SHARE:
            template, edits = splice(template, rng.choice(train), lang, rng), edits - 1
        for _ in range(edits):
            template = perturb(template, lang, rng)
        prompt = template.format(**slots)
        if not is_held_out(form, lang, prompt, slots):
            return prompt


def is_held_out(form: str, lang: str, prompt: str, slots: dict[str, str]) -> bool:
    """Whether `prompt` is one of the form's held-out sentences."""
    return prompt in {template.format(**slots) for template in PHRASINGS[form][lang].held_out}


def canonical(form: str, lang: str, **slots: str) -> str:
    """The form's first training phrasing with `slots` filled in."""
    return PHRASINGS[form][lang].train[0].format(**slots)


def phrase(form: str, lang: str, slots: dict[str, str], rng: random.Random, split: str = "train") -> str:
    """One phrasing of `split`, picked by `rng`, with `slots` filled in."""
    return rng.choice(PHRASINGS[form][lang].of(split)).format(**slots)


def phrasing_split(form: str, lang: str, prompt: str, slots: dict[str, str]) -> str:
    """Which split's phrasing `prompt` is ("train" or "held-out"); a ValueError for a wording of neither."""
    for split in SPLITS:
        if prompt in {template.format(**slots) for template in PHRASINGS[form][lang].of(split)}:
            return split
    raise ValueError(f"'{prompt}' is no phrasing of the '{form}' questions.")
