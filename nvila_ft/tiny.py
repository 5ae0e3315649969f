"""`python -m nvila_ft.tiny OUT`: builds a tiny NVILA checkpoint (see `nvila_ft.demo.tiny`)."""

import sys

from nvila_ft.demo.tiny import main

if __name__ == "__main__":
    sys.exit(main())
