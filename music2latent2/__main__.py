"""``python -m music2latent2 ...``: the same command line as the ``music2latent2`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
