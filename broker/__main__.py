import sys

from hq.broker.main import main

sys.exit(main())
