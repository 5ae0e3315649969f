"""Gradio app to compare a base NVILA checkpoint with fine-tuned runs on your own images (`python -m app`).

`app.previewer` holds what the app does (no gradio import: tests call it directly); `app.app` is the page
and the command line.
"""
