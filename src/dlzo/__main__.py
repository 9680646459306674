import sys

from dlzo.cli import main

sys.exit(main())
