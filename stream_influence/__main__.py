import sys

from stream_influence.cli import main

sys.exit(main())
