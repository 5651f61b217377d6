"""`python -m snapbright` runs the CLI."""

from snapbright.cli.app import main

main()
