"""The command line. `attnopt.cli.main` is the console entry point; `app` the Typer app."""
from attnopt.cli.app import app, main

__all__ = ["app", "main"]
