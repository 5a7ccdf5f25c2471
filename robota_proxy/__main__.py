import sys

from robota_proxy.launcher import main

sys.exit(main())
