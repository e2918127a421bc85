"""`playattention recipe validate FILE...`: each file resolved and checked as train would, the model
built on the meta device (so, unlike the other recipe actions, it imports torch)."""
from __future__ import annotations

from ..errors import ConfigError, UserError
from ..probe import load_buildable
from . import print_errors
from .recipe import print_warnings


def cmd_recipe_validate(args) -> int:
    """Every file resolved and checked: ``FILE: ok`` on stdout, each problem on stderr; 2 if any."""
    bad = 0
    for path in args.files:
        try:
            recipe = load_buildable(path, args.set, args.plugin)
        except ConfigError as exc:
            print_errors(exc.lines)
            bad += 1
        except (UserError, FileNotFoundError) as exc:
            print_errors([f"{path}: {exc}" if path not in str(exc) else str(exc)])
            bad += 1
        else:
            print_warnings(recipe, path)
            print(f"{path}: ok")
    return 2 if bad else 0
