"""The `rag-persona` command line: the typer app with every command group and the plugins registered."""

from __future__ import annotations

# Importing a command module registers its commands; this order is the order `--help` lists them in.
from rag_persona.cli import chat as _chat_commands  # noqa: F401  ask, chat, render-prompt, evaluate
from rag_persona.cli import models as _model_commands  # noqa: F401  models prepare|list
from rag_persona.cli import persona as _persona_commands  # noqa: F401  persona import|export
from rag_persona.cli import retrieval as _retrieval_commands  # noqa: F401  index, search, eval-…, tune-…
from rag_persona.cli.common import _progress, app, echo_json, friendly

__all__ = ["_progress", "app", "echo_json", "friendly", "load_plugins", "main"]


def load_plugins() -> None:
    """Add the commands of `training` and `ui`, which register through entry points, once.

    They import this library, never the other way round, so the dependency arrows stay one-way. Once:
    under `python -m rag_persona.cli.app` this module is loaded twice (as __main__ and by its name) but
    both share the one app in `common`.
    """
    from importlib.metadata import entry_points

    if getattr(app, "plugins_loaded", False):
        return
    app.plugins_loaded = True
    for ep in entry_points(group="rag_persona.commands"):
        ep.load()(app)


def main() -> None:
    app()


load_plugins()


if __name__ == "__main__":
    main()
