import sys

from prance.cli import main

sys.exit(main())
