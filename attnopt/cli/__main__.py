"""`python -m attnopt.cli ...` runs the command line."""
from attnopt.cli.app import main

main()
