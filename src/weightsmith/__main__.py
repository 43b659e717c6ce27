"""``python -m weightsmith`` runs the command-line tool."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())  # main returns the exit code (1: findings); dropping it would exit 0
