import sys

from speedx.align.cli import main

sys.exit(main())
