"""The app's server side: request validation, model loading, generation, GPU time and "as code" snippets.

``app.py`` builds the UI on top of this package; this package builds on the ``sega`` library and never imports
gradio's UI.
"""
