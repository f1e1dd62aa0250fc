import sys

from softtriple.cli import main

sys.exit(main())
