import sys

from nvila_ft.train.cli import main

sys.exit(main())
