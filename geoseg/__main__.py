"""``python -m geoseg`` runs the command line."""

from geoseg.cli import run

run()
