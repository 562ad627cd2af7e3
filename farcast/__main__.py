"""``python -m farcast``: the command line (the same as the ``farcast`` command)."""

from farcast.flows.cli import main

if __name__ == "__main__":
    main()
