"""``python -m demo``: the embedded demo (:mod:`demo.run`)."""

import sys

from demo.run import main

sys.exit(main())
