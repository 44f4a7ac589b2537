import sys

from hq.workers.main import main

sys.exit(main())
