"""outloop: run unattended agent loops that never hold a key.

The package is split so that the core (everything outside ``commands/`` and ``cli.py``) never imports Typer.
"""

__version__ = "0.1.0"
