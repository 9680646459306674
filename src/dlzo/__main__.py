import sys

from dlzo.cli.main import main

sys.exit(main())
