import sys

from robota_proxy.cli import main

sys.exit(main())
