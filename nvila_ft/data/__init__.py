"""Training data: rows in any supported source format -> one normalized sample dict each, then a preflight
check of every row.

    from nvila_ft.data import load_samples, preflight
    samples = load_samples("../shared/data/vqa_rad", "train")
    report = preflight(samples, on_bad_row="skip")   # report.ok: rows safe to train on

- `rows`: the sample dict and the ONE row normaliser (LLaVA rows and the Python API use it).
- `llava`, `vqa_rad`, `hf`: one module per source format.
- `loading`: `load_samples` (format detection) and `load_split` (a recipe's `data` section).
- `checks`: `preflight`: media, turns, placeholders and lengths of every row, reported all at once.
- `pairs`: preference rows (prompt + media, chosen, rejected) for DPO: loading and their preflight.
"""

from nvila_ft.data.checks import BadRow, PreflightReport, VideoCheck, preflight
from nvila_ft.data.loading import FORMATS, detect_format, load_samples, load_split
from nvila_ft.data.rows import DataError, normalize_row

__all__ = ["FORMATS", "BadRow", "DataError", "PreflightReport", "VideoCheck", "detect_format", "load_samples",
           "load_split", "normalize_row", "preflight"]
