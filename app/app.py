"""Preview fine-tuned NVILA runs next to their base model: upload an image, ask, compare the answers.

    python -m app                                   # runs found under ./runs, their bases from the runs
    python -m app --runs-dir runs/medical --port 7860
    python app/app.py --base Efficient-Large-Model/NVILA-Lite-2B --run runs/medical/output

Needs the `app` extra (`pip install -e ".[app]"`, which installs gradio). The page binds to 127.0.0.1 and
makes no share link unless asked (`--share`); it can only choose among the bases and runs listed at
start-up, and uploads are limited to images (videos with the `video` extra) of `--max-upload-mb`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `python app/app.py`: import from the repository root (this folder's app.py would shadow the package).
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from app.media import (  # noqa: E402
    IMAGE_EXTENSIONS,
    UploadError,
    check_upload,
    page_message,
    video_extensions,
    video_support,
)
from app.previewer import BASE, MAX_COMPARED_RUNS, Previewer  # noqa: E402 - after the path fix above
from nvila_ft.cli_errors import user_errors  # noqa: E402
from nvila_ft.inference import resolve_device  # noqa: E402

logger = logging.getLogger("app")

INTRO = """# nvila-ft preview
Compare a base NVILA checkpoint with your fine-tuned runs: pick the runs, upload an image, ask a question.
Answers are greedy (open *Sampling* to sample) and stream base first, then each run."""


def _gradio():
    try:
        import gradio as gr
    except ImportError as err:
        raise SystemExit('The preview app needs gradio: pip install -e ".[app]"') from err
    return gr


def build_demo(previewer: Previewer):
    """The gradio page (a `gr.Blocks`) for `previewer`; launch it with :func:`launch`."""
    gr = _gradio()
    bases = previewer.bases()
    base0 = bases[0] if bases else None
    runs0 = previewer.runs_for(base0)[:1]
    videos = video_extensions()

    def answer_boxes(runs):
        return [gr.update(label=f"Tuned: {runs[i]}" if i < len(runs) else "Tuned", visible=i < len(runs), value="")
                for i in range(MAX_COMPARED_RUNS)]

    def run_details(runs):
        if not runs:
            return "Pick a tuned run to see its recipe and metrics."
        return "\n\n".join(previewer.run_summary(r) for r in runs)

    def examples_for(runs):
        if not runs:
            return gr.update(samples=[], visible=False), "", []
        rows, note = previewer.examples(runs[0])
        text = f"Examples: none for {runs[0]} ({note})." if note else f"Examples from the eval split of {runs[0]}:"
        return gr.update(samples=[list(r) for r in rows], visible=bool(rows)), text, rows

    def on_base(base):
        runs = previewer.runs_for(base)[:1]
        return gr.update(choices=previewer.runs_for(base), value=runs)

    def loss_curve(runs):
        image = previewer.loss_curve(runs[0]) if runs else None
        return gr.update(value=image, visible=image is not None, label=f"Loss curve: {runs[0]}" if runs else "")

    def on_runs(runs):
        runs = list(runs or [])
        return (*answer_boxes(runs), run_details(runs), loss_curve(runs), *examples_for(runs))

    def on_upload(path):
        """Checks an upload at once (type, size, decodable) and shows it; a refused file is removed."""
        if path is None:
            return None, *previews(None, None)
        try:
            kind = check_upload(path, previewer.max_upload_mb)
        except UploadError as err:
            gr.Warning(str(err))
            return None, *previews(None, None)
        return gr.skip(), *previews(path, kind)

    def previews(path, kind):
        shown = [gr.update(value=path if kind == "image" else None, visible=kind != "video")]
        if videos:
            shown.append(gr.update(value=path if kind == "video" else None, visible=kind == "video"))
        return (*shown, "")  # "": a new upload has no reference answer

    def on_example(index, rows):
        image, question, reference = rows[index]
        return image, *previews(image, "image")[:-1], question, reference

    def ask(media, question, base, runs, temperature, top_p, max_new_tokens):
        runs = list(runs or [])
        if media is None:
            raise gr.Error("Upload an image first.")
        if not base:
            raise gr.Error("No base checkpoint: start the app with --base or a --runs-dir that holds runs.")
        if not (question or "").strip():
            raise gr.Error("Type a question first.")
        start = time.perf_counter()
        try:
            previews = {key: previewer.tiles(media, base, None if key == BASE else key) for key in [BASE, *runs]}
        except (UploadError, ValueError, OSError) as err:  # VideoError is a ValueError; names the temp path
            raise gr.Error(page_message(err, media)) from err
        shown = runs[0] if runs else BASE
        tiles = previews[shown]
        info = [f"**What the model saw** ({'base' if shown == BASE else shown}): {tiles.summary}"]
        info += [f"- {'base' if k == BASE else k} sees something else: {p.summary}" for k, p in previews.items()
                 if p.summary != tiles.summary]
        gallery = list(zip(tiles.tiles, tiles.captions))
        blank = [""] * (1 + MAX_COMPARED_RUNS)
        yield gallery, "\n".join(info), *blank, "Answering with the base model..."
        answers = {}
        try:
            for answers in previewer.answer(media, question, base, runs, max_new_tokens, temperature, top_p):
                current = list(answers)[-1]
                status = f"Answering with {'the base model' if current == BASE else current}..."
                texts = [answers.get(BASE, "")] + [answers.get(r, "") for r in runs]
                yield gr.skip(), gr.skip(), *(texts + blank)[: 1 + MAX_COMPARED_RUNS], status
        except (UploadError, ValueError, KeyError, OSError) as err:
            raise gr.Error(page_message(err, media)) from err
        texts = [answers.get(BASE, "")] + [answers.get(r, "") for r in runs]
        yield (gr.skip(), gr.skip(), *(texts + blank)[: 1 + MAX_COMPARED_RUNS],
               f"Done in {time.perf_counter() - start:.1f} s (greedy)" if not temperature else
               f"Done in {time.perf_counter() - start:.1f} s (temperature {temperature:g}, top-p {top_p:g})")

    with gr.Blocks(title="nvila-ft preview", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        if previewer.problems():
            gr.Markdown("**Runs left out:**\n" + "\n".join(f"- {p}" for p in previewer.problems()))
        examples_state = gr.State([])
        with gr.Row():
            with gr.Column(scale=2):
                base = gr.Dropdown(bases, value=base0, label="Base checkpoint", elem_id="base",
                                   info="From --base and from the runs found; the page cannot load other paths.")
                runs = gr.Dropdown(previewer.runs_for(base0), value=runs0, multiselect=True,
                                   max_choices=MAX_COMPARED_RUNS, label="Tuned runs", elem_id="runs",
                                   info=f"Run folders trained on this base (up to {MAX_COMPARED_RUNS} at once).")
                # A plain file upload: only the listed types, checked by check_upload before anything
                # decodes them (a gr.Image would decode first and fail with a stack trace on a bad file).
                media = gr.File(label="Image" + (" or video" if videos else ""), type="filepath",
                                file_types=list(IMAGE_EXTENSIONS + videos), elem_id="media-input", height=120)
                if not videos:
                    gr.Markdown(f"Images only: {video_support()}.")
                image = gr.Image(label="Image", interactive=False, elem_id="image-preview", height=300)
                video = gr.Video(label="Video", interactive=False, elem_id="video-preview", height=300,
                                 visible=False) if videos else None
                question = gr.Textbox(label="Question", placeholder="e.g. Is there a fracture?", lines=2,
                                      elem_id="question")
                reference = gr.Textbox(label="Reference answer (examples only)", interactive=False,
                                       elem_id="reference")
                ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0, 1.5, value=0, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p (when sampling)")
                    max_new_tokens = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens")
                examples_note = gr.Markdown(elem_id="examples-note")
                examples = gr.Dataset(components=[image, question, reference], samples=[], type="index",
                                      label="Examples (one click loads image and question)", elem_id="examples",
                                      visible=False)
            with gr.Column(scale=3):
                status = gr.Markdown(elem_id="status")
                with gr.Row():
                    base_answer = gr.Textbox(label="Base", lines=5, interactive=False, elem_id="answer-base")
                    tuned_answers = [gr.Textbox(label="Tuned", lines=5, interactive=False, visible=False,
                                                elem_id=f"answer-run-{i}") for i in range(MAX_COMPARED_RUNS)]
                tile_info = gr.Markdown(elem_id="tile-info")
                gallery = gr.Gallery(label="Tiles (or frames) the vision tower sees", columns=5, height=320, preview=False,
                                     object_fit="contain", elem_id="tiles")
                with gr.Accordion("Run: recipe, metrics.json and loss curve", open=True):
                    with gr.Row():
                        details = gr.Markdown(elem_id="run-details")
                        curve = gr.Image(label="Loss curve", interactive=False, visible=False, elem_id="loss-curve",
                                         type="pil")

        run_outputs = [*tuned_answers, details, curve, examples, examples_note, examples_state]
        base.change(on_base, base, runs)
        runs.change(on_runs, runs, run_outputs)
        demo.load(on_runs, runs, run_outputs)
        shown = [image, video] if videos else [image]
        media.upload(on_upload, media, [media, *shown, reference])
        media.clear(lambda: previews(None, None), None, [*shown, reference])
        examples.click(on_example, [examples, examples_state], [media, *shown, question, reference])
        ask_inputs = [media, question, base, runs, temperature, top_p, max_new_tokens]
        ask_outputs = [gallery, tile_info, base_answer, *tuned_answers, status]
        ask_button.click(ask, ask_inputs, ask_outputs, concurrency_limit=1)
        question.submit(ask, ask_inputs, ask_outputs, concurrency_limit=1)
    return demo


def launch(previewer: Previewer, host: str = "127.0.0.1", port: int | None = None, share: bool = False):
    """Serves the page (blocks until stopped). Uploads over `previewer.max_upload_mb` are refused by gradio."""
    demo = build_demo(previewer)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: anyone who can reach this machine can use the app (no login)", host)
    demo.queue(default_concurrency_limit=1)
    # quiet: gradio would print "To create a public link, set `share=True` in `launch()`", which is not how
    # this app shares (--share); the address is printed here instead (a share link gradio prints itself).
    demo.launch(server_name=host, server_port=port, share=share, show_error=True, ssr_mode=False, quiet=True,
                max_file_size=int(previewer.max_upload_mb * 2**20), prevent_thread_lock=True,
                allowed_paths=[str(previewer.media_dir)])  # only the example copies made by the app
    print(f"app: {demo.local_url} (Ctrl-C stops it)", flush=True)
    demo.block_thread()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m app", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  python -m app --runs-dir runs\n"
               "  python -m app --base demo:tiny-nvila --run runs/quickstart/output --port 7861\n\n"
               f"Images: {', '.join(IMAGE_EXTENSIONS)}. Videos: "
               + (", ".join(video_extensions()) or f"off ({video_support()})") + ".")
    parser.add_argument("--runs-dir", default="runs", help="folder searched for run folders written by "
                        "nvila_ft.train, checkpoint-<step> folders included (default: runs)")
    parser.add_argument("--base", help="base checkpoint (hub id or folder) to offer; runs whose recorded base "
                        "is not found from here use it")
    parser.add_argument("--run", action="append", default=[], metavar="DIR",
                        help="a run folder outside --runs-dir (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine "
                        "only; 0.0.0.0 exposes the app, which has no login)")
    parser.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free)")
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted (default 20)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="weights dtype (default: the runs' model.dtype, else float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--quantize", action=argparse.BooleanOptionalAction, default=None,
                        help="4-bit LLM (bitsandbytes nf4); default: as the runs were trained (tune.llm: qlora)")
    parser.add_argument("--preload", action="store_true", help="load the first base and its first run before "
                        "serving, instead of on the first question")
    return parser.parse_args(argv)


@user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    _gradio()
    resolve_device(args.device)  # --device cuda without a GPU: refused now, not at the first question
    previewer = Previewer(runs_dir=args.runs_dir, base=args.base, runs=args.run, device=args.device,
                          dtype=args.dtype, quantize=args.quantize, max_upload_mb=args.max_upload_mb)
    for problem in previewer.problems():
        logger.warning("left out: %s", problem)
    if not previewer.bases():
        print(f"error: no run folders under {args.runs_dir!r} and no --base; nothing to preview. Train a run "
              "(python -m nvila_ft.train recipes/quickstart.yaml) or pass --base / --run.", file=sys.stderr)
        return 2
    print(f"bases: {previewer.bases()}\nruns: {list(previewer.runs)}", flush=True)
    if args.preload:
        base = previewer.default_base()
        previewer.load(base, previewer.runs_for(base)[:1])
    launch(previewer, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
