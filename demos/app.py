"""The Gradio demo: chat about an image with grounded boxes, draw from a prompt, caption a pile of files.

Tabs:
- Chat & ground: upload an image (or make an EmojiScenes scene), ask; the answer streams in and the boxes it names
  are drawn over the image.
- Draw: prompt -> the base stage and the relay super-resolution stage side by side; seed, steps, guidance; progress.
- Caption: several files -> a table and a JSONL download (the rows of `multimodal caption`).

Everything a tab shows comes from the `Engine`; this file only arranges it. Chat, draw and caption requests share
one slot of Gradio's queue, so one model call runs at a time (the models share the machine's cores), at most
QUEUE_SIZE wait; uploads are limited in size; a bad file or an impossible request shows one friendly sentence
instead of a traceback.

The model sees exactly the file the user gave: an upload arrives as a file (`chat-upload`) that the suite reads
itself, as the CLI does (any mode, 16-bit PNGs included, with one friendly sentence for a file it cannot read), and
the preview (`chat-image`) shows what the model sees; a made scene is handed over as a lossless PNG.

Components carry `elem_id`s (`chat-upload`, `chat-image`, `q`, `ask`, `chat`, `boxed`, `prompt`, `draw`, `base`,
`relay`, ...), which the browser test uses.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gradio as gr

from multimodal.assets import DRAWING_LIMITS, EMBEDDED_LIMITS
from multimodal.captioning import caption_rows
from multimodal.drawing import prompt_warning
from multimodal.engine import EMBEDDED_NAME, EngineError, GroundedAnswer, Sampling
from multimodal.image import ImageError, load_image
from multimodal.world import ATTRIBUTION

DRAW_EXAMPLES = ["a dog with a hat", "a cat wearing sunglasses", "an apple to the left of a car",
                 "a fox with a crown on a blue background", "一只戴着帽子的狗"]
# Any wording works, in English or Chinese, and a follow-up may refer back ("What is it wearing?").
QUESTION_EXAMPLES = ["Where is the dog?", "Find the cat.", "How many dogs are there?", "What is it wearing?",
                     "Describe the image with boxes.", "狗在哪里？", "图中有几只猫？"]
MAX_UPLOAD = "10mb"
QUEUE_SIZE = 32
ENGINE_QUEUE = "engine"  # chat, draw and caption share one queue slot: one model call at a time, in arrival order
# The embedded models draw small images: show them large, with sharp pixels.
PIXEL_CSS = "#base img, #relay img, #boxed img {image-rendering: pixelated; width: 100%; height: 100%; " \
            "object-fit: contain}"


def _friendly(error: Exception) -> gr.Error:
    return gr.Error(str(error), print_exception=False)


def build_app(engine, max_new_tokens: int = 256) -> gr.Blocks:
    """The demo as a `gr.Blocks` over `engine`; call `launch(app)` (or `app.launch(...)`) to serve it."""
    sampling = Sampling(max_new_tokens=max_new_tokens)

    def load(path: str | None):
        if path is None:
            raise gr.Error("Upload an image or make a scene first.", print_exception=False)
        try:
            return load_image(path)
        except ImageError as error:  # name the upload, not the server's temporary copy
            raise gr.Error(str(error).replace(path, Path(path).name), print_exception=False) from None

    def use_upload(path: str | None):
        """The uploaded file as the model will read it: preview, source path, a new conversation; the upload box is
        emptied again, ready for the next file."""
        if path is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), None
        try:
            image = load(path)
        except gr.Error as error:
            gr.Warning(error.message)  # a toast, not an error badge on every output
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), None
        return image, path, [], None, None

    def make_scene(seed: float):
        scene = engine.scene(int(seed))
        path = Path(tempfile.mkdtemp(prefix="scene-")) / f"scene-{int(seed)}.png"
        scene.save(path)  # lossless: the model reads these very pixels
        return scene, str(path), [], None

    def ask(path: str | None, question: str, messages: list):
        if not question.strip():
            gr.Warning("Type a question about the image.")
            return
        image = load(path)
        history = [(m["role"], _text(m["content"])) for m in messages]
        messages = [*messages, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        answer = ""
        try:
            for delta in engine.chat_stream(image, question, history, sampling):
                answer += delta
                messages[-1] = {"role": "assistant", "content": answer}
                yield messages, gr.skip(), ""
        except (EngineError, ValueError) as error:
            raise _friendly(error) from None
        yield messages, GroundedAnswer.parse(answer, image).drawn_on(image), ""

    def draw(prompt: str, negative: str, seed: float, steps: float, guidance: float, size: str,
             progress=gr.Progress()):
        height, width = _size(size)
        progress(0, desc="drawing")
        try:
            drawing = engine.draw(prompt, negative, size=(height, width), steps=int(steps),
                                  guidance_scale=float(guidance), seed=int(seed),
                                  progress=lambda step, total: progress(step / total, desc="drawing"))
        except (EngineError, ValueError) as error:
            raise _friendly(error) from None
        if engine.name == EMBEDDED_NAME and (warning := prompt_warning(prompt)):
            gr.Warning(warning)
        return drawing.base[0], drawing.relay[0]

    def caption(files: list | None, grounded: bool):
        if not files:
            raise gr.Error("Choose one or more image files to caption.", print_exception=False)
        paths = [str(f) for f in files]
        try:
            rows = caption_rows(engine, paths, grounded, sampling)
        except (EngineError, ValueError) as error:
            raise _friendly(error) from None
        for row in rows:
            # Show the upload's name, not the server's temporary path.
            name = Path(row["image"]).name
            if "error" in row:
                row["error"] = row["error"].replace(row["image"], name)
            row["image"] = name
        download = Path(tempfile.mkdtemp(prefix="captions-")) / "captions.jsonl"
        download.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        table = [[row["image"], row.get("grounded_caption", row.get("caption", "")), row.get("error", "")]
                 for row in rows]
        return table, str(download)

    with gr.Blocks(title="GLM multimodal", analytics_enabled=False) as app:
        gr.Markdown(f"## GLM multimodal demo\nModel: `{engine.name}`"
                    + (f"<br><small>{EMBEDDED_LIMITS} {DRAWING_LIMITS}</small>" if engine.name == EMBEDDED_NAME
                       else ""))
        with gr.Tab("Chat & ground"):
            with gr.Row():
                with gr.Column():
                    upload = gr.File(label="Image file", file_types=["image"], type="filepath", elem_id="chat-upload",
                                     height=120)
                    image = gr.Image(label="What the model sees", interactive=False, format="png",
                                     elem_id="chat-image", height=230)
                    source = gr.State(None)  # the path of the file the model reads
                    with gr.Row():
                        scene_seed = gr.Number(value=0, precision=0, label="Scene seed", elem_id="scene-seed")
                        scene_button = gr.Button("Make a scene", elem_id="make-scene")
                with gr.Column():
                    boxed = gr.Image(label="Boxes", interactive=False, format="png", elem_id="boxed", height=320)
            chat = gr.Chatbot(label="Conversation", elem_id="chat", height=260)
            with gr.Row():
                question = gr.Textbox(label="Question", placeholder="Where is the dog?", elem_id="q", scale=4)
                ask_button = gr.Button("Ask", variant="primary", elem_id="ask", scale=1)
            gr.Examples(QUESTION_EXAMPLES, inputs=[question], label="Questions")
            clear = gr.Button("New conversation", elem_id="clear")

        with gr.Tab("Draw"):
            if engine.draw_sizes:
                _draw_tab(engine, draw)
            else:
                gr.Markdown(f"The model `{engine.name}` has no text-to-image stage; load a suite with `diffusion/`.")

        with gr.Tab("Caption"):
            files = gr.File(file_count="multiple", label="Images", elem_id="caption-files")
            grounded = gr.Checkbox(label="Grounded (with boxes)", elem_id="grounded")
            caption_button = gr.Button("Caption", variant="primary", elem_id="caption")
            table = gr.Dataframe(headers=["image", "caption", "error"], interactive=False, elem_id="caption-table",
                                 wrap=True, column_widths=["20%", "50%", "30%"])
            download = gr.File(label="captions.jsonl", interactive=False, elem_id="caption-jsonl")

        gr.Markdown(f"<small>{ATTRIBUTION}</small>")

        scene_button.click(make_scene, [scene_seed], [image, source, chat, boxed])
        upload.upload(use_upload, [upload], [image, source, chat, boxed, upload])  # a new image: a new conversation
        clear.click(lambda: ([], None), None, [chat, boxed])
        for trigger in (ask_button.click, question.submit):
            trigger(ask, [source, question, chat], [chat, boxed, question], concurrency_id=ENGINE_QUEUE)
        caption_button.click(caption, [files, grounded], [table, download], concurrency_id=ENGINE_QUEUE)
    app.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return app


def _draw_tab(engine, draw) -> None:
    """Prompt, examples and settings -> the base and relay images side by side."""
    sizes = [f"{w}x{h}" for h, w in engine.draw_sizes]
    default_steps, default_guidance = engine.draw_defaults
    prompt = gr.Textbox(label="Prompt", placeholder="a dog with a hat", elem_id="prompt")
    gr.Examples(DRAW_EXAMPLES, inputs=[prompt], label="Prompts")
    negative = gr.Textbox(label="Negative prompt (optional)", elem_id="negative")
    with gr.Row():
        seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
        steps = gr.Slider(1, 50, value=default_steps, step=1, label="Base steps", elem_id="steps")
        guidance = gr.Slider(0, 10, value=default_guidance, step=0.5, label="Guidance", elem_id="guidance")
        size = gr.Dropdown(sizes, value=sizes[0], label="Size", elem_id="size")
    button = gr.Button("Draw", variant="primary", elem_id="draw")
    with gr.Row():
        base = gr.Image(label="Base stage", interactive=False, format="png", elem_id="base", height=320)
        relay = gr.Image(label="Relay stage (final)", interactive=False, format="png", elem_id="relay", height=320)
    button.click(draw, [prompt, negative, seed, steps, guidance, size], [base, relay], concurrency_id=ENGINE_QUEUE)


def _text(content) -> str:
    """A chatbot message's content as plain text (Gradio may hand back a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def _size(size: str) -> tuple[int, int]:
    width, height = size.split("x")
    return int(height), int(width)


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
    """Serve the demo; with `block=False` return at once (the server runs in a thread)."""
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],  # no web fonts: works offline
                              font_mono=["ui-monospace", "monospace"])
    return app.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD, ssr_mode=False, theme=theme,
                      css=PIXEL_CSS, prevent_thread_lock=not block, quiet=not block, footer_links=[])
