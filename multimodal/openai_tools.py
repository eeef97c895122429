"""OpenAI function calling over the GLM tool formats (`glm.tools`): `tools`, `tool_choice`, assistant `tool_calls`
and `tool` messages in; a reply's tool call out as `tool_calls`, whole or streamed.

GLM models call one tool per assistant turn, so an assistant message may carry one tool call; a `tool` message
becomes GLM's observation turn. A reply is a tool call when it parses as a call of a listed tool
(`glm.tools.parse_tool_call`), and plain text otherwise. A streamed reply is held back only while its first line could
still be a listed tool's name, so plain answers stream as they are written.
"""

from __future__ import annotations

import json
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict

from glm.tools import ToolCall, parse_tool_call, tool_names


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCallBody(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionTool(_Body):
    type: Literal["function"]
    function: dict


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def call_from_message(calls: list[ToolCallBody], param: str) -> ToolCall:
    """An assistant message's tool call as GLM's assistant turn; a ValueError names what is wrong."""
    if len(calls) != 1:
        raise ValueError(f"{param}: GLM models call one tool per assistant turn; send each call as its own assistant "
                         "message, followed by its tool message.")
    try:
        arguments = json.loads(calls[0].function.arguments or "{}")
    except json.JSONDecodeError:
        raise ValueError(f"{param}: the tool call's arguments are not valid JSON.") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{param}: the tool call's arguments must be a JSON object.")
    return ToolCall(calls[0].function.name, arguments)


def engine_tool_choice(choice: ToolChoice | None) -> str | dict:
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else {"function": {"name": choice.function.name}}


def listed_names(tools: list[dict], tool_choice: str | dict) -> list[str]:
    """The names of the tools the model was shown: none when tool_choice is "none"."""
    return [] if tool_choice == "none" or not tools else tool_names(tools)


def tool_call_entry(call: ToolCall, index: int | None = None) -> dict:
    entry = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
    return entry if index is None else {"index": index, **entry}


def reply_message(answer: str, names: list[str], finish_reason: str) -> tuple[dict, str]:
    """(the assistant message, its finish reason) for a whole reply."""
    call = parse_tool_call(answer, names) if names else None
    if call is None:
        return {"role": "assistant", "content": answer}, finish_reason
    return {"role": "assistant", "content": None, "tool_calls": [tool_call_entry(call)]}, "tool_calls"


class ToolCallStream:
    """Splits a streamed reply into text to send now and, at the end, the tool call it turned out to be."""

    def __init__(self, names: list[str]):
        self.names = names
        self.held = ""
        self.mode = "text" if not names else "undecided"  # then "text" or "call"

    def feed(self, delta: str) -> str:
        """The text to send now (empty while held back)."""
        if self.mode == "text":
            return delta
        self.held += delta
        if self.mode == "call":
            return ""
        head, newline, _ = self.held.lstrip().partition("\n")
        if newline and head.strip() in self.names:
            self.mode = "call"
            return ""
        if newline or not any(name.startswith(head) for name in self.names):
            self.mode, text, self.held = "text", self.held, ""
            return text
        return ""

    def finish(self) -> tuple[str, ToolCall | None]:
        """(held text still to send, the tool call) once the reply has ended; a call that does not parse is text."""
        call = parse_tool_call(self.held, self.names) if self.mode != "text" else None
        text, self.held = ("" if call else self.held), ""
        return text, call
