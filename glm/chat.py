"""Chat with a GLM text model (ChatGLM3-6B, GLM-4-9B-chat): the conversation laid out as the official templates lay it
out (`GLMTokenizer.build_chat`), function tools listed as `glm.tools` describes, answers streamed.

`GLMChat(model, tokenizer)` is the engine's chat model for checkpoints without a vision tower (the image must be
None). Turns are (role, content) pairs with roles system, user, assistant and observation (a tool's result); an
earlier tool call is ("assistant", ToolCall), rendered as the model family writes calls. A `forced_tool` starts the
answer with that tool's name, the header the model writes before a call, so the model writes its arguments;
`likeliest_tool` picks that tool by the model's own probabilities when any of several will do.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from glm.generate import SamplingConfig, TextDeltas, generate, generate_tokens
from glm.model import GLMModel
from glm.tools import ToolCall, tool_call_message, tool_names

# ChatGLM3's tool demo opens its system message with this when the caller gives none.
CHATGLM3_TOOL_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"
ROLES = ("system", "user", "assistant", "observation")


class GLMChat:
    sees_images = False

    def __init__(self, model: GLMModel, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer

    # --- prompts -------------------------------------------------------------------------------------------------

    def messages(self, turns: Sequence[tuple], tools: Sequence[dict] = ()) -> list[dict]:
        """The conversation as `build_chat` messages; `tools` join the first system message, or one placed first
        (GLM-4: an empty one, which the template drops but for its tools block; ChatGLM3: its tool demo's)."""
        if not turns or turns[-1][0] not in ("user", "observation"):
            raise ValueError("A conversation must end with the user's message or a tool's result.")
        messages = []
        for role, content in turns:
            if role not in ROLES:
                raise ValueError(f"A conversation turn has the role '{role}'; known: {', '.join(ROLES)}.")
            if isinstance(content, ToolCall):
                if role != "assistant":
                    raise ValueError("Only the assistant calls tools.")
                messages.append(tool_call_message(content, self.tokenizer.renders_chat_template))
            else:
                messages.append({"role": role, "content": content})
        if tools:
            if messages[0]["role"] != "system":
                default = "" if self.tokenizer.renders_chat_template else CHATGLM3_TOOL_SYSTEM
                messages.insert(0, {"role": "system", "content": default})
            messages[0]["tools"] = list(tools)
        return messages

    def prompt_ids(self, turns: Sequence[tuple], tools: Sequence[dict] = (), forced_tool: str | None = None
                   ) -> list[int]:
        """Token ids up to where the answer starts; with `forced_tool`, the call's header is already written."""
        if forced_tool is not None and forced_tool not in tool_names(tools):
            raise ValueError(f"The forced tool '{forced_tool}' is not among the request's tools.")
        ids = self.tokenizer.build_chat(self.messages(turns, tools))
        return ids + (self._call_header(forced_tool) if forced_tool is not None else [])

    def _call_header(self, name: str) -> list[int]:
        # Both families write the tool's name and a line break right after <|assistant|>; GLM-4's tokenizer never
        # merges a line break with the text around it, so these ids are those of the whole rendered call.
        return self.tokenizer.encode(f"{name}\n")

    @torch.inference_mode()
    def likeliest_tool(self, turns: Sequence[tuple], tools: Sequence[dict]) -> str:
        """The tool whose call header the model finds most probable as the start of its answer."""
        prompt = self.prompt_ids(turns, tools)
        scores = {}
        for name in tool_names(tools):
            header = self._call_header(name)
            ids = torch.as_tensor([prompt + header], device=self.model.device)  # [1, P + H]
            logits = self.model(ids[:, :-1]).float()[0, len(prompt) - 1 :]  # [H, V]: the header's predictions
            scores[name] = F.log_softmax(logits, -1).gather(1, ids[0, len(prompt) :, None]).sum().item()
        return max(scores, key=scores.get)

    # --- answers -------------------------------------------------------------------------------------------------

    def _config(self, sampling) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                              top_p=sampling.top_p, seed=sampling.seed, stop_tokens=self.tokenizer.stop_tokens)

    def _limit(self, prompt_length: int, sampling) -> int:
        return max(0, min(sampling.max_new_tokens, self.model.config.max_seq_len - prompt_length))

    def plan_tools(self, turns: Sequence[tuple], tools: Sequence[dict], tool_choice="auto"
                   ) -> tuple[list[dict], str | None]:
        """(the tools the prompt lists, the tool the answer must call or None) for an OpenAI `tool_choice`: "auto",
        "none" (no tools listed), "required" (the only tool, or the likeliest), or {"function": {"name": ...}}."""
        names = tool_names(tools)
        if tool_choice in ("none", "auto"):
            return ([] if tool_choice == "none" else list(tools)), None
        if not tools:
            raise ValueError("tool_choice asks for a tool call, but the request lists no tools.")
        if tool_choice == "required":
            return list(tools), names[0] if len(names) == 1 else self.likeliest_tool(turns, tools)
        name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
        if name is None:
            raise ValueError(f"Unknown tool_choice {tool_choice!r}; use none, auto, required or "
                             '{"type": "function", "function": {"name": ...}}.')
        if name not in names:
            raise ValueError(f"tool_choice names the function '{name}', which is not among the request's tools.")
        return list(tools), name

    def stream(self, image, turns: Sequence[tuple], sampling, usage=None, tools: Sequence[dict] = (),
               tool_choice="auto") -> Iterator[str]:
        """Text deltas of the answer (a forced call's header first); `usage` (a `vlm.chat.Usage`) is filled in at the
        end."""
        if image is not None:
            raise ValueError("This is a text model; it cannot see images.")
        tools, forced = self.plan_tools(turns, tools, tool_choice)
        prompt = self.prompt_ids(turns, tools, forced)
        return self._stream(prompt, f"{forced}\n" if forced is not None else "", sampling, usage)

    def _stream(self, prompt: list[int], header: str, sampling, usage) -> Iterator[str]:
        if header:
            yield header
        deltas = TextDeltas(self.tokenizer.decode)
        for step in generate_tokens(self.model, [prompt], self._config(sampling)):
            if delta := deltas.push(step[0]):
                yield delta
        if delta := deltas.flush():
            yield delta
        if usage is not None:
            usage.record(len(prompt), deltas.tokens, len(deltas.tokens) < self._limit(len(prompt), sampling))

    def answer_batch(self, images: Sequence, turns_list: Sequence[Sequence[tuple]], sampling,
                     usages=None) -> list[str]:
        """One answer per conversation, the rows run as one padded batch; `usages`, one per row, are filled in."""
        if any(image is not None for image in images):
            raise ValueError("This is a text model; it cannot see images.")
        prompts = [self.prompt_ids(turns) for turns in turns_list]
        outputs = generate(self.model, prompts, self._config(sampling))
        for prompt, ids, usage in zip(prompts, outputs, usages or ()):
            usage.record(len(prompt), ids, len(ids) < self._limit(len(prompt), sampling))
        return [self.tokenizer.decode(ids) for ids in outputs]
