"""``python -m trpo_ext``: the same as the ``trpo-ext`` command (see :mod:`trpo_ext.cli`)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
