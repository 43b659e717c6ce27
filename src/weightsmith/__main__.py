"""``python -m weightsmith`` runs the command-line tool, with the console script's exit codes."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
