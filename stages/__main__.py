"""``python -m stages fit --config ...``: the same CLI as ``lightning`` and ``speechless``."""

import sys

from stages.cli import main

sys.exit(main())
