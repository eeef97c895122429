"""GLM tokenizers behind one interface, with GLM's special tokens and chat templates built at token level.

Three vocabularies are supported:
- the suite's own byte-level BPE (a `tokenizer.json` of HF `tokenizers`), trained by `train_bpe` with GLM-4's
  special token names; it uses GLM-4's chat format;
- ChatGLM3's SentencePiece `tokenizer.model`: special tokens [MASK] [gMASK] [sMASK] sop eop <|system|> <|user|>
  <|assistant|> <|observation|> take the ids right after the SentencePiece vocabulary; eos is SentencePiece's </s>;
- GLM-4's tiktoken `tokenizer.model` (lines of "base64(token) rank"): <|endoftext|> [MASK] [gMASK] [sMASK] <sop> <eop>
  <|system|> <|user|> <|assistant|> <|observation|> and the image/video markers take the ids after the ranks.

Chat prompts are `[gMASK] sop` then, per message, `<|role|>` + encode(metadata + "\n") + encode(content), then
`<|assistant|>` to ask for a reply (THUDM's `build_single_message`). Text is always encoded as plain text: a special
token's spelling inside user text does not become the special token. Generation stops at eos, `<|user|>` or
`<|observation|>`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from pathlib import Path

ROLES = ("system", "user", "assistant", "observation")

GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)
CHATGLM3_SPECIAL_TOKENS = (
    "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)
# GLM-4's pre-tokenizer split (tokenization_chatglm.py / transformers' converter).
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class GLMTokenizer:
    """encode/decode text, look up special tokens, and build chat prompts; see the module docstring for formats."""

    def __init__(self, backend, special_ids: dict[str, int], prefix: Sequence[str], eos: str, name: str):
        self.backend = backend  # an object with encode(text) -> list[int], decode(ids) -> str, vocab_size
        self.special_ids = dict(special_ids)
        self.special_names = {i: s for s, i in self.special_ids.items()}
        self.prefix_names = tuple(prefix)
        self.eos_token = eos
        self.name = name

    # Construction ------------------------------------------------------------------------------------------------

    @classmethod
    def from_bpe(cls, path: str | Path) -> GLMTokenizer:
        """The suite's byte-level BPE from a `tokenizer.json` (GLM-4 special token names and chat format)."""
        return cls._from_bpe_backend(_BPEBackend.load(path))

    @classmethod
    def _from_bpe_backend(cls, backend: _BPEBackend) -> GLMTokenizer:
        names = list(dict.fromkeys([*GLM4_SPECIAL_TOKENS, *backend.special_tokens()]))
        return cls._glm4_style(backend, {s: backend.token_to_id(s) for s in names}, "bpe")

    @classmethod
    def from_tiktoken(cls, path: str | Path) -> GLMTokenizer:
        """GLM-4's tiktoken `tokenizer.model`."""
        backend = _TiktokenBackend.load(path)
        return cls._glm4_style(backend, backend.special_ids, "glm4-tiktoken")

    @classmethod
    def from_sentencepiece(cls, path: str | Path) -> GLMTokenizer:
        """ChatGLM3's SentencePiece `tokenizer.model`."""
        backend = _SentencePieceBackend.load(path)
        eos = backend.sp.id_to_piece(backend.sp.eos_id())
        specials = {eos: backend.sp.eos_id(), **backend.special_ids}
        return cls(backend, specials, prefix=("[gMASK]", "sop"), eos=eos, name="chatglm3-sentencepiece")

    @classmethod
    def load(cls, path: str | Path) -> GLMTokenizer:
        """Any supported vocabulary: a tokenizer.json (BPE), or a tokenizer.model (tiktoken text or SentencePiece);
        a folder is searched for those names."""
        path = Path(path)
        if path.is_dir():
            for name in ("tokenizer.json", "tokenizer.model"):
                if (path / name).exists():
                    return cls.load(path / name)
            raise FileNotFoundError(f"{path} holds neither tokenizer.json nor tokenizer.model.")
        if not path.exists():
            raise FileNotFoundError(f"Tokenizer file {path} does not exist.")
        if path.suffix == ".json":
            return cls.from_bpe(path)
        head = path.read_bytes()[:256]
        if _looks_like_tiktoken(head):
            return cls.from_tiktoken(path)
        return cls.from_sentencepiece(path)

    @classmethod
    def _glm4_style(cls, backend, special_ids: dict[str, int | None], name: str) -> GLMTokenizer:
        absent = [s for s, i in special_ids.items() if i is None]
        if absent:
            raise ValueError(f"The vocabulary lacks GLM special tokens: {', '.join(absent)}.")
        return cls(backend, special_ids, prefix=("[gMASK]", "<sop>"), eos="<|endoftext|>", name=name)

    def save(self, path: str | Path) -> Path:
        """Write the BPE vocabulary as tokenizer.json (only the suite's own BPE can be saved)."""
        if not isinstance(self.backend, _BPEBackend):
            raise ValueError("Only the suite's own BPE tokenizer can be saved; other vocabularies are read-only.")
        return self.backend.save(path)

    # Text ----------------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    def encode(self, text: str) -> list[int]:
        """Plain-text ids; special token spellings inside `text` stay text."""
        return self.backend.encode(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        pieces, run = [], []
        for token in ids:
            token = int(token)
            if token in self.special_names:
                if run:
                    pieces.append(self.backend.decode(run))
                    run = []
                if not skip_special_tokens:
                    pieces.append(self.special_names[token])
            else:
                run.append(token)
        if run:
            pieces.append(self.backend.decode(run))
        return "".join(pieces)

    def token_id(self, special: str) -> int:
        if special not in self.special_ids:
            raise ValueError(f"Unknown special token {special!r}; known: {', '.join(self.special_ids)}.")
        return self.special_ids[special]

    @property
    def eos_id(self) -> int:
        return self.special_ids[self.eos_token]

    @property
    def pad_id(self) -> int:
        return self.eos_id

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        return (self.eos_id, self.token_id("<|user|>"), self.token_id("<|observation|>"))

    # Chat ----------------------------------------------------------------------------------------------------------

    def prefix(self) -> list[int]:
        return [self.token_id(s) for s in self.prefix_names]

    @property
    def renders_chat_template(self) -> bool:
        """GLM-4 vocabularies: the official chat template renders `<|role|>{metadata}\n{content}` as text and
        tokenizes it whole (so a content that starts with a line break merges with the header's), and drops messages
        with empty content. ChatGLM3 encodes the header and the content separately and keeps every message."""
        return self.prefix_names == ("[gMASK]", "<sop>")

    def encode_message(self, role: str, content: str, metadata: str = "") -> list[int]:
        """One message's ids. Text that looks like a special token ("<|user|>") stays plain text, unlike the official
        template's rendering, so a user cannot forge a turn."""
        if role not in ROLES:
            raise ValueError(f"Unknown chat role {role!r}; known: {', '.join(ROLES)}.")
        header = [self.token_id(f"<|{role}|>")]
        if self.renders_chat_template:
            return header + self.encode(f"{metadata}\n{content}")
        return header + self.encode(f"{metadata}\n") + self.encode(content)

    def build_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation: dicts with `role`, `content` and optional `metadata` (e.g. a tool name) and
        `tools` (OpenAI-style function tools, listed in a system prompt as `glm.tools` describes)."""
        from glm.tools import chatglm3_system_content, glm4_tools_prompt

        ids = self.prefix()
        for message in messages:
            content, tools = message["content"], message.get("tools")
            if tools and self.renders_chat_template:
                ids += [self.token_id("<|system|>")] + self.encode(glm4_tools_prompt(tools))
            elif tools and message["role"] == "system":
                content = chatglm3_system_content(content, tools)
            elif tools:
                raise ValueError("ChatGLM3 takes tools in a system message only.")
            if self.renders_chat_template and not content:
                continue  # the official GLM-4 template skips a message without content
            ids += self.encode_message(message["role"], content, message.get("metadata", ""))
        if add_generation_prompt:
            ids.append(self.token_id("<|assistant|>"))
        return ids


def train_bpe(
    texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = GLM4_SPECIAL_TOKENS
) -> GLMTokenizer:
    """Train a byte-level BPE (GLM-4's pre-tokenizer split, all 256 bytes in the alphabet) with GLM-4's special
    tokens, plus any others in `special_tokens` (appended after them)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(dict.fromkeys([*GLM4_SPECIAL_TOKENS, *special_tokens])),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.encode_special_tokens = True  # special spellings in text stay text
    return GLMTokenizer._from_bpe_backend(_BPEBackend(tokenizer))


def write_tiktoken_model(ranks: dict[bytes, int], path: str | Path) -> Path:
    """Write mergeable ranks in GLM-4's tokenizer.model format (one "base64(token) rank" line each)."""
    path = Path(path)
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda x: x[1])]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Backends


class _BPEBackend:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, path):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
        tokenizer.encode_special_tokens = True
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def special_tokens(self) -> list[str]:
        return [t.content for _, t in sorted(self.tokenizer.get_added_tokens_decoder().items()) if t.special]

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def save(self, path) -> Path:
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / "tokenizer.json"
        self.tokenizer.save(str(path))
        return path


def _looks_like_tiktoken(head: bytes) -> bool:
    first = head.split(b"\n", 1)[0].split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except ValueError:
        return False
    return True


class _TiktokenBackend:
    def __init__(self, encoding, special_ids: dict[str, int]):
        self.encoding = encoding
        self.special_ids = special_ids

    @classmethod
    def load(cls, path):
        import tiktoken

        ranks = {}
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path} line {number} is not 'base64(token) rank'.")
            ranks[base64.b64decode(parts[0])] = int(parts[1])
        special_ids = {token: len(ranks) + i for i, token in enumerate(GLM4_SPECIAL_TOKENS)}
        encoding = tiktoken.Encoding(name=f"glm4:{Path(path).name}", pat_str=GLM4_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=special_ids)
        return cls(encoding, special_ids)

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids, errors="replace")


class _SentencePieceBackend:
    def __init__(self, sp):
        self.sp = sp
        self.special_ids = {token: sp.vocab_size() + i for i, token in enumerate(CHATGLM3_SPECIAL_TOKENS)}

    @classmethod
    def load(cls, path):
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{path} is neither a tiktoken nor a SentencePiece tokenizer.model ({error}).") from None
        return cls(sp)

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size() + len(self.special_ids)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)
