"""``python -m imbreg_fast``: the main job (see :mod:`imbreg_fast.experiments`; ``--help`` for options)."""
from .experiments.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
