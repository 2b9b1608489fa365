"""``python -m lorax_merge``: the ``lorax-merge`` command."""

from lorax_merge.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
