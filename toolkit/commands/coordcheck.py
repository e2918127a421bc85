"""`playattention coordcheck`: mean activation per layer kind across widths after a few steps, standard vs mup."""
from __future__ import annotations

import argparse

from .. import coordcheck
from . import add_recipe_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    coordcheck.add_arguments(p)
    add_recipe_options(p)
    p.set_defaults(func=coordcheck.run)
