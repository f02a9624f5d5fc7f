import sys

from wildsight.cli import main

if __name__ == "__main__":  # not again in a spawned worker process (eval lowshot --jobs)
    sys.exit(main())
