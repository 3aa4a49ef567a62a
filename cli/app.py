"""Kept for ``from cli.app import app, main`` (older scripts and tests): the command tree is
assembled in cli/main.py from the command modules."""

from cli.main import app, main

__all__ = ["app", "main"]
