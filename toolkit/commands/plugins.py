"""`playattention plugins`: every registered component with its options and source."""
from __future__ import annotations

import argparse
import re

import attrs

from .. import families
from ..plugin_manager import PluginManager
from ..registry import Registry


def cmd_plugins(args) -> int:
    pm = PluginManager()
    for spec in args.plugin:
        pm.add(spec)
    if args.family is not None:
        families.family(args.family)  # RegistryError: one line with "did you mean"
        if args.name is not None:
            pm.registry.get(args.family, args.name)  # UnknownComponentError: the registered names
    print(render_plugins(pm.registry, hooks=args.hooks, family=args.family, name=args.name))
    return 1 if pm.failures and args.strict else 0


def render_plugins(registry: Registry, hooks: bool = False, family: str | None = None, name: str | None = None) -> str:
    """Every family (or one) with its registered parts (or one): one-line doc, source, and each option
    as ``name: type = default  description``."""
    lines = []
    if hooks:
        lines.append("hooks (implement any with @hookimpl; see toolkit/families.py):")
        lines += [f"  {hook}(register)  {doc}" for hook, doc in families.HOOKS.items()]
        lines.append("")
    for fam in families.FAMILIES:
        if family is not None and fam.name != family:
            continue
        where = f"recipe: {fam.where}" + ("[]" if fam.many else "") if fam.where else "not in recipes"
        lines.append(f"{fam.name}:" if not hooks else f"{fam.name}:  ({fam.hook}; {where}; {fam.contract})")
        for part in registry.names(fam.name):
            if name is not None and part != name:
                continue
            comp = registry.get(fam.name, part)
            lines.append(f"  {part:<16} {comp.doc}")
            lines.append(f"  {'':<16} from {comp.source}")
            docs = comp.option_docs()
            for opt, typ, default in comp.option_fields():
                head = f"{opt}: {typ} " + ("(required)" if default is attrs.NOTHING else f"= {default!r}")
                doc = short_doc(docs.get(opt, ""))
                lines.append(f"  {'':<16}   {head:<36}  {doc}".rstrip() if doc else f"  {'':<16}   {head}")
        if not registry.names(fam.name):
            lines.append("  (none registered)")
        lines.append("")
    if registry.failures:
        lines.append("failed plugins:")
        lines.extend(f"  {f}" for f in registry.failures)
    return "\n".join(lines).rstrip()


def short_doc(text: str, width: int = 100) -> str:
    """The first sentence of an option's description, cut at a word before ``width`` characters."""
    first = re.split(r"(?<=[.!?])\s+(?=[A-Z])", text, maxsplit=1)[0]  # "et al. 2023" does not end one
    return first if len(first) <= width else first[:width].rsplit(" ", 1)[0] + " ..."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("List registered components: each with its one-line description, who "
                     "registered it, and its options (type, default, description). Give a FAMILY, or a "
                     "FAMILY and a NAME, to list only those.")
    p.add_argument("family", nargs="?", metavar="FAMILY", help="only this family: " + ", ".join(families.NAMES))
    p.add_argument("name", nargs="?", metavar="NAME", help="only this component of FAMILY")
    p.add_argument("--plugin", action="append", default=[], help="also load this plugin file or module")
    p.add_argument("--strict", action="store_true", help="exit 1 if any plugin failed to load")
    p.add_argument("--hooks", action="store_true", help="also list the hooks, and each family's place and contract")
    p.set_defaults(func=cmd_plugins)
