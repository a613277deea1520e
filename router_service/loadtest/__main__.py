import sys

from router_service.loadtest.cli import main

sys.exit(main())
