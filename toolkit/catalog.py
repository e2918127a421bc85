"""The shipped recipes (``recipes/`` of the checkout): listed with one-line descriptions, copied to start from.

Read as TOML text only: listing never resolves a recipe or loads its plugins.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .errors import UsageError, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: the shipped recipes: beside the toolkit package in a checkout (an editable install)
SHIPPED = Path(__file__).resolve().parent.parent / "recipes"


def shipped_recipes(root: Path = SHIPPED) -> list[Path]:
    """The recipe files of ``root`` (ablation files live in its ablations/ and are not recipes)."""
    if not root.is_dir():
        raise UsageError(f"no shipped recipes here ({root} is missing: an installed copy has none; "
                         f"see the repository's recipes/)")
    return sorted(root.glob("*.toml"))


def description(path: Path) -> str:
    """A recipe's ``description``, else its leading comment's first line, else ""."""
    text = path.read_text(encoding="utf-8")
    try:
        desc = tomllib.loads(text).get("description")
    except tomllib.TOMLDecodeError:
        desc = None
    if isinstance(desc, str) and desc.strip():
        return desc.strip()
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    return first.lstrip("#").strip() if first.startswith("#") else ""


def render_list(root: Path = SHIPPED) -> str:
    """``name  description`` for every shipped recipe."""
    paths = shipped_recipes(root)
    width = max((len(p.stem) for p in paths), default=0)
    return "\n".join(f"{p.stem:<{width}}  {description(p)}".rstrip() for p in paths)


def find_shipped(name: str, root: Path = SHIPPED) -> Path:
    """The shipped recipe called ``name`` (with or without .toml); UsageError with a suggestion if none."""
    stem = name[:-5] if name.endswith(".toml") else name
    names = [p.stem for p in shipped_recipes(root)]
    if stem not in names:
        hint = did_you_mean(stem, names)
        raise UsageError(f"no shipped recipe {name!r}" + (f"; did you mean {hint!r}?" if hint else "")
                         + " (`playattention recipe list` lists them)")
    return root / f"{stem}.toml"


def _bases(path: Path) -> list[Path]:
    """The files ``path`` extends, nearest first (shipped recipes extend files beside them)."""
    out = []
    while True:
        base = tomllib.loads(path.read_text(encoding="utf-8")).get("extends")
        if not isinstance(base, str):
            return out
        path = path.parent / base
        if path in out or not path.is_file():
            return out
        out.append(path)


def copy_recipe(name: str, dest: str | Path, root: Path = SHIPPED) -> list[Path]:
    """Copy the shipped recipe ``name`` to ``dest``, with the files it extends beside it (the ``extends``
    names are relative); never overwrites. Returns the files written, ``dest`` first."""
    src = find_shipped(name, root)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists():
        raise UsageError(f"{dest}: already exists; not overwritten (give a new file name)")
    if not dest.parent.is_dir():
        raise UsageError(f"{dest.parent}: no such folder")
    plan = [(src, dest)]
    for base in _bases(src):
        target = dest.parent / base.name
        if target.exists():
            if target.read_bytes() != base.read_bytes():
                raise UsageError(f"{target}: exists and differs from the shipped {base.name} that "
                                 f"{src.name} extends; not overwritten (copy into another folder)")
            continue
        plan.append((base, target))
    for a, b in plan:
        b.write_bytes(a.read_bytes())
    return [b for _, b in plan]
