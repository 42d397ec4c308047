"""`python -m loraplex_cli ...` runs the `loraplex` command."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
