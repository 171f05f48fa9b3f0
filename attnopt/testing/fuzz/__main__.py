"""`python -m attnopt.testing.fuzz`: the fuzzer's command line (driver.main)."""
import sys

from attnopt.testing.fuzz.driver import main

sys.exit(main())
