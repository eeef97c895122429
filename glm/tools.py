"""Tool calling in the GLM chat formats: the system prompt that lists the tools, and the tool call parsed back out of
a reply.

GLM-4 (glm-4-9b-chat's chat template, rendered as transformers' `apply_chat_template` renders it): a message carrying
`tools` is preceded by a system block, the assistant's introduction and "# 可用工具", then per function "## {name}"
and the function's JSON (indent 4, non-ASCII kept). The
model calls a tool by answering `{name}\\n{JSON arguments}`; the result goes back as an `observation` message.
ChatGLM3 (THUDM's `build_chat_input`): a system message's `tools` are appended to its content as JSON (indent 4);
the model answers with the tool name as metadata and the call as code, `{name}\\n```python\\ntool_call(a=1)\\n````.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from dataclasses import dataclass

GLM4_TOOL_INTRO = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                   "你的任务是针对用户的问题和要求提供适当的答复和支持。")
GLM4_TOOL_SUFFIX = "在调用上述函数时，请使用 Json 格式表示调用的参数。"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


def _functions(tools: Sequence[dict]) -> list[dict]:
    functions = []
    for tool in tools:
        if tool.get("type", "function") != "function" or "function" not in tool:
            raise ValueError(f"Only function tools are supported, not {tool.get('type')!r}.")
        if "name" not in tool["function"]:
            raise ValueError("A function tool needs a name.")
        functions.append(tool["function"])
    return functions


def glm4_tools_prompt(tools: Sequence[dict]) -> str:
    """The text of GLM-4's tools system block (after `<|system|>`), newline first."""
    text = f"\n{GLM4_TOOL_INTRO}\n\n# 可用工具"
    for function in _functions(tools):
        # One line break before "##": the template writes two after a block tag, and transformers' template engine
        # (trim_blocks, as `apply_chat_template` runs it) drops the first.
        text += f"\n## {function['name']}\n\n{json.dumps(function, ensure_ascii=False, indent=4)}\n{GLM4_TOOL_SUFFIX}"
    return text


def chatglm3_system_content(content: str, tools: Sequence[dict]) -> str:
    """ChatGLM3's system content with its tools appended."""
    return content + "\n" + json.dumps(list(tools), indent=4, ensure_ascii=False)


def tool_names(tools: Sequence[dict]) -> list[str]:
    return [function["name"] for function in _functions(tools)]


def parse_tool_call(reply: str, names: Sequence[str]) -> ToolCall | None:
    """The tool call a reply makes, in either format, or None when it is a plain answer (or names no known tool, or
    its arguments do not parse)."""
    name, _, body = reply.strip().partition("\n")
    if name.strip() not in names:
        return None
    body = body.strip()
    if body.startswith("```"):  # ChatGLM3: tool_call(key=value, ...) in a code block
        code = body.strip("`").removeprefix("python").strip()
        try:
            call = ast.parse(code, mode="eval").body
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
                return None
            return ToolCall(name.strip(), {k.arg: ast.literal_eval(k.value) for k in call.keywords})
        except (SyntaxError, ValueError):
            return None
    try:
        arguments = json.loads(body or "{}")
    except json.JSONDecodeError:
        return None
    return ToolCall(name.strip(), arguments) if isinstance(arguments, dict) else None


def tool_call_message(call: ToolCall, renders_chat_template: bool) -> dict:
    """An earlier tool call as the assistant message the model family writes: GLM-4 `{name}\\n{JSON}`, ChatGLM3
    `{name}\\n` then its code block (as THUDM's `chat` keeps it in the history)."""
    if renders_chat_template:
        content = json.dumps(call.arguments, ensure_ascii=False)
    else:
        arguments = ", ".join(f"{key}={value!r}" for key, value in call.arguments.items())
        content = f"```python\ntool_call({arguments})\n```"
    return {"role": "assistant", "metadata": call.name, "content": content}
