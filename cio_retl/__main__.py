import sys

from cio_retl.cli import main

sys.exit(main())
