import sys

from spectrt.cli import main

sys.exit(main())
