"""`python -m app --runs-dir runs`: see `app.app`."""

import sys

from app.app import main

sys.exit(main())
