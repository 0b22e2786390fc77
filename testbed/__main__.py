"""`python -m testbed` is the `testbed` command."""

from .cli import app

app(prog_name="testbed")
