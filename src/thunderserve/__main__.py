"""`python -m thunderserve` runs the CLI."""

from thunderserve.cli import main

main()
