"""`python -m dicomnode` runs the command line."""

from dicomnode.cli import app

app()
