"""Experiments built on the library (not part of its API): the main job behind ``python -m imbreg_fast``.

- :mod:`.cli`: the command line (``benchmark synthetic``, ``train depth``, ``train tabular``, ``demo``);
- :mod:`.common`: what the experiments share (flags, devices and backends, progress bars, figures, JSON,
  step timing, tables);
- :mod:`.synthetic`: the Balanced MSE paper's synthetic protocol;
- :mod:`.methods`: the DIR methods as training recipes (shared by the depth and tabular runs);
- :mod:`.depth`: a dense depth-regression run on generated scenes, with each method's cost per step;
- :mod:`.tabular`: the same methods on a user's CSV file;
- :mod:`.published`: the published formulations of the methods (the baselines of ``--compare-reference``,
  of ``bench/`` and of the tests).

Importing this package imports none of the experiments (``python -m imbreg_fast`` imports the one it runs).
"""
