"""``python -m imbreg_fast``: the Balanced MSE demo (see :mod:`imbreg_fast.demo`; ``--help`` for options)."""
from .demo import main

if __name__ == "__main__":
    raise SystemExit(main())
