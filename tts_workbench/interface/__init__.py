"""Interface: the top layer, what a person touches.

The ``tts-workbench`` command line and the notebook playback widgets. May import every layer
below it; nothing imports it.
"""
