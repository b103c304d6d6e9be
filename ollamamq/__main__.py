"""`python -m ollamamq`."""

from ollamamq.cli import main

main()
