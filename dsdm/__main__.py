import sys

from dsdm.cli import main

sys.exit(main())
