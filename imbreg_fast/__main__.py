"""``python -m imbreg_fast``: the main job (:mod:`imbreg_fast.experiments.cli`; ``--help`` for the commands)."""
from .experiments.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
