"""`python -m djlink` is the `djlink` command."""

from djlink.cli import main

main()
