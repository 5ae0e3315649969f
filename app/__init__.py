"""Gradio app to compare a base NVILA checkpoint with fine-tuned runs on your own images (`python -m app`).

`app.previewer` holds what the app does (runs, models, answers) and `app.media` the upload checks and tile
previews (no gradio import in either: tests call them directly); `app.app` is the page and the command line.
"""
