"""The VQA-RAD subset the GPU suite trains on: the first rows of a local release and their images (stdlib only).

    python3 benchmarks/vqa_rad_subset.py ../shared/data/vqa_rad .gpu_data/vqa_rad [--train 64 --test 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def pack_vqa_rad(src: Path, dst: Path, train_rows: int = 64, test_rows: int = 8) -> Path:
    """Copies the first `train_rows` / `test_rows` of `src`'s trainset.json / testset.json and their images
    into `dst` (same layout, so `data.format=vqa_rad` reads it). Returns `dst`."""
    (dst / "images").mkdir(parents=True, exist_ok=True)
    for name, n in (("trainset.json", train_rows), ("testset.json", test_rows)):
        rows = json.loads((src / name).read_text())[:n]
        (dst / name).write_text(json.dumps(rows))
        for row in rows:
            shutil.copy2(src / "images" / row["image_name"], dst / "images" / row["image_name"])
    return dst


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--test", type=int, default=8)
    args = parser.parse_args()
    out = pack_vqa_rad(args.src, args.dst, args.train, args.test)
    print(f"{out}: {len(list((out / 'images').iterdir()))} images")
