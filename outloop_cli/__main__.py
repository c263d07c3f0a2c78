"""`python -m outloop_cli`: how `run --each` starts each workspace's run with the interpreter it runs under."""

from outloop_cli.cli import main

main()
