import sys

from slkit.running.cli import main

sys.exit(main())
