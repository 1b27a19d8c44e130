"""`kvsim` subcommands that live outside `sim/cli.py`: sim's own modules, and the commands other packages
declare under the `kvsim.commands` entry-point group (`gpu/` declares `gpu` and `roundattn` in
pyproject.toml), so sim never imports them by name.

Each plugin is a function `register(subparsers)` that adds its subcommand to kvsim's parser.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

from sim.errors import KvsimError

# sim's own subcommand modules, each exposing register(subparsers)
OWN_PLUGINS = ("sim.cli_trace", "sim.cli_sweep")
GROUP = "kvsim.commands"


def command_entry_points() -> dict[str, str]:
    """Subcommand name -> "module:function" that registers it: the installed distribution's `kvsim.commands`
    entry points, updated from the source checkout's pyproject.toml where there is one (an editable
    install's metadata is only as new as its last `pip install -e`)."""
    found = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=GROUP)}
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():
        try:
            import tomllib
        except ImportError:  # Python 3.10: the installed metadata alone
            return found
        doc = tomllib.loads(pyproject.read_text())
        found.update(doc.get("project", {}).get("entry-points", {}).get(GROUP, {}))
    return found


def register_commands(subparsers) -> None:
    """Add every plugin's subcommand to `subparsers`."""
    for mod in OWN_PLUGINS:
        importlib.import_module(mod).register(subparsers)
    for name, target in command_entry_points().items():
        register_entry_point(subparsers, name, target)


def register_entry_point(subparsers, name: str, target: str) -> None:
    """Register subcommand `name` through `target` ("module:function"). A module that cannot be imported
    (an optional dependency missing) leaves every other command working: `kvsim NAME` then says why in
    one line and exits 2."""
    module, _, func = target.partition(":")
    try:
        register = getattr(importlib.import_module(module), func or "register")
    except ImportError as exc:
        why = str(exc)
        # takes any arguments (none of them is an option to it), so the call reaches the one-line error
        p = subparsers.add_parser(name, help=f"unavailable: {why}", add_help=False, prefix_chars="\0")
        p.add_argument("args", nargs="*")

        def unavailable(args):
            raise KvsimError(f"kvsim {name}: {module} cannot be imported ({why}); expected its dependencies installed")
        p.set_defaults(func=unavailable)
        return
    register(subparsers)
