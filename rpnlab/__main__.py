"""``python -m rpnlab ...``: the same as the ``rpnlab`` console script."""

from rpnlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
