"""Shell completion: `playattention completion bash|zsh` prints a script to source.

The script is generated from the argument parser (commands, their options and choices) and the recipe
schema (every ``--set`` key, with each registered component's options), so it never runs
playattention while completing: a TAB costs nothing. zsh gets the same function through bashcompinit.
"""
from __future__ import annotations

import argparse
import shlex

import attrs

from . import families
from .catalog import SHIPPED
from .recipe import Recipe
from .registry import Registry

#: what a command's positional arguments are, where not recipe files: folders, families, shells, ...
POSITIONALS = {"runs": "dirs", "generate": "dirs", "eval": "dirs", "convert": "dirs", "plugins": "family",
               "completion": "shells", "recipe": "recipe"}
SHELLS = ("bash", "zsh")


def set_keys(registry: Registry) -> list[str]:
    """Every key ``--set`` takes: the recipe's fields, and at each component's place its kind and the
    options of every registered kind."""
    places = {f.where: f.name for f in families.FAMILIES if f.where and not f.many}
    keys: set[str] = set()

    def walk(obj, prefix: str) -> None:
        for field in attrs.fields(type(obj)):
            path, value = f"{prefix}{field.name}", getattr(obj, field.name)
            if path in places:
                keys.update((path, f"{path}.kind"))
                for name in registry.names(places[path]):
                    keys.update(f"{path}.{opt}" for opt, _, _ in registry.get(places[path], name).option_fields())
            elif attrs.has(type(value)):
                walk(value, f"{path}.")
            else:
                keys.add(path)

    walk(Recipe(), "")
    return sorted(keys)


def _options(parser: argparse.ArgumentParser) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """(every option string, those that take a value, choices of an option by its strings)."""
    opts, valued, choices = [], [], {}
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        opts += action.option_strings
        if action.nargs != 0:
            valued += action.option_strings
        if action.choices:
            choices.update({o: [str(c) for c in action.choices] for o in action.option_strings})
    return opts, valued, choices


def _words(items) -> str:
    return shlex.quote(" ".join(items))


def bash_script(parser: argparse.ArgumentParser, registry: Registry) -> str:
    """The bash completion function ``_playattention``, registered with ``complete``."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = list(sub.choices)
    top_opts, _, _ = _options(parser)
    valued_all: set[str] = set()
    cases, choice_cases = [], {}
    for name, p in sub.choices.items():
        opts, valued, choices = _options(p)
        inner = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
        if inner is not None:  # recipe ACTION: each action's options
            for q in inner.choices.values():
                o, va, ch = _options(q)
                opts, valued = opts + o, valued + va
                choices.update(ch)
        valued_all.update(valued)
        for o, c in choices.items():
            choice_cases.setdefault(tuple(c), set()).add(o)
        cases.append(f"        {shlex.quote(name)}) opts={_words(sorted(set(opts)))}; kind={POSITIONALS.get(name, 'files')};;")
    components = [f"        {fam}) words={_words(registry.names(fam))};;" for fam in families.NAMES]
    choice_lines = [f"        {'|'.join(sorted(o))}) COMPREPLY=($(compgen -W {_words(c)} -- \"$cur\")); return;;"
                    for c, o in choice_cases.items()]
    recipe_actions = next(a for a in sub.choices["recipe"]._actions if isinstance(a, argparse._SubParsersAction))
    lines = [
        "# bash completion for playattention: source it, e.g. from ~/.bashrc:",
        "#   source <(playattention completion bash)",
        "_playattention_files() {  # recipe files and folders",
        "    compopt -o filenames 2>/dev/null",
        "    COMPREPLY=($(compgen -d -- \"$cur\") $(compgen -f -X '!*.toml' -- \"$cur\"))",
        "}",
        "_playattention() {",
        "    local cur=\"${COMP_WORDS[COMP_CWORD]}\" prev=\"${COMP_WORDS[COMP_CWORD-1]}\"",
        f"    local commands={_words(commands)} valued={_words(sorted(valued_all))}",
        f"    local set_keys={_words(set_keys(registry))}",
        "    local cmd='' i w skip=0",
        "    local -a args=()",
        "    for ((i = 1; i < COMP_CWORD; i++)); do  # the command and its positional words so far",
        "        w=\"${COMP_WORDS[i]}\"",
        "        if ((skip)); then skip=0; continue; fi",
        "        case \"$w\" in",
        "            -*=*) ;;",
        "            -*) [[ \" $valued \" == *\" $w \"* ]] && skip=1;;",
        "            *) if [[ -z $cmd ]]; then cmd=\"$w\"; else args+=(\"$w\"); fi;;",
        "        esac",
        "    done",
        "    case \"$prev\" in",
        "        --set) compopt -o nospace 2>/dev/null",
        "            COMPREPLY=($(compgen -W \"$set_keys\" -S = -- \"$cur\")); return;;",
        *choice_lines,
        "    esac",
        "    if [[ \" $valued \" == *\" $prev \"* && -n $cmd ]]; then",
        "        compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- \"$cur\")); return",
        "    fi",
        "    if [[ -z $cmd ]]; then",
        f"        COMPREPLY=($(compgen -W \"$commands {' '.join(top_opts)}\" -- \"$cur\")); return",
        "    fi",
        "    local opts='' kind=files words=''",
        "    case \"$cmd\" in",
        *cases,
        "    esac",
        "    if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W \"$opts\" -- \"$cur\")); return; fi",
        "    case \"$kind\" in",
        "        dirs) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -d -- \"$cur\"));;",
        f"        shells) COMPREPLY=($(compgen -W {_words(SHELLS)} -- \"$cur\"));;",
        "        family)",
        "            if ((${#args[@]} == 0)); then",
        f"                COMPREPLY=($(compgen -W {_words(families.NAMES)} -- \"$cur\"))",
        "            elif ((${#args[@]} == 1)); then",
        "                case \"${args[0]}\" in",
        *["    " + c for c in components],
        "                esac",
        "                COMPREPLY=($(compgen -W \"$words\" -- \"$cur\"))",
        "            fi;;",
        "        recipe)",
        "            if ((${#args[@]} == 0)); then",
        f"                COMPREPLY=($(compgen -W {_words(recipe_actions.choices)} -- \"$cur\"))",
        "            elif [[ ${args[0]} == copy && ${#args[@]} == 1 ]]; then",
        f"                COMPREPLY=($(compgen -W {_words(shipped_names())} -- \"$cur\"))",
        "            else _playattention_files; fi;;",
        "        *) _playattention_files;;",
        "    esac",
        "}",
        "complete -F _playattention playattention",
    ]
    return "\n".join(lines) + "\n"


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.toml"))


def zsh_script(parser: argparse.ArgumentParser, registry: Registry) -> str:
    """The bash function, through zsh's bashcompinit (one script to keep right, not two)."""
    return ("#compdef playattention\n# zsh completion for playattention: source <(playattention completion zsh)\n"
            "autoload -U +X compinit && compinit\nautoload -U +X bashcompinit && bashcompinit\n"
            + bash_script(parser, registry))


def script(shell: str, parser: argparse.ArgumentParser, registry: Registry) -> str:
    return {"bash": bash_script, "zsh": zsh_script}[shell](parser, registry)
