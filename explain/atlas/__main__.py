"""``python -m explain.atlas ...``: see :mod:`explain.atlas.cli`."""

from explain.atlas.cli import main

if __name__ == "__main__":
    main()
