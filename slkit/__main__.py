import sys

from slkit.cli import main

sys.exit(main())
