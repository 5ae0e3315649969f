import sys

from nvila_ft.plan.report import main

sys.exit(main())
