"""Experiments built on the library (not part of its API): the main job behind ``python -m imbreg_fast``.

- :mod:`imbreg_fast.experiments.demo`: the Balanced MSE demo on a synthetic imbalanced task (``make demo``).
"""
