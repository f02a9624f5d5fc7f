import sys

from wildsight.cli import main

sys.exit(main())
