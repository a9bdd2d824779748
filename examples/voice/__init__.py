"""A voice pipeline on a paced stream: phrases in, espeak-ng speech out, progress reported as the audio plays.

``python -m examples.voice --help`` (README.md in this directory).
"""
