"""`rag-persona serve`: the Gradio app and the OpenAI-compatible API on one port, registered by entry point.

`--persona ID|DIR` (repeatable) serves several personas at once, the first the default: each its own
persona.json, index and adapter rule; personas needing the same (model, adapter) share one loaded model.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from rag_persona.cli import _progress, friendly
from rag_persona.cli.common import AdapterOpt, EngineOpt, ModelOpt
from rag_persona.errors import RagPersonaError

from .access import ADMIN_AUTH_ENV, AUTH_ENV, LOCAL_HOSTS, Access, access_from_options


def parse_bool(value: str, option: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise RagPersonaError(f"{option}: expected true or false, got {value!r}")


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise RagPersonaError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror})") from None


def serve(
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: tuple[str, str] | None = None,
    access: Access | None = None,
    model: str | None = None,
    adapter: str | None = None,
    index: str | Path | None = None,
    share: bool = False,
    engine: str = "auto",
    log=print,
    personas: Sequence[str] | None = None,
) -> None:
    """Load the engines, build the app, and serve it with uvicorn until interrupted.

    `access` (chat and admin sign-ins, --admin) wins over `auth` (chat credentials only, no administration).
    `personas`: ids under knowledge/ or folders, the first the default (none: the settings' persona);
    `index` only with one persona.
    """
    # here, not at the top: uvicorn, gradio and torch would slow every other rag-persona command
    import uvicorn

    from .app import create_app
    from .engine import check_personas, serve_personas
    from .loading import engine_loader

    access = access or Access(chat=auth)
    # checked again here for callers that skip access_from_options
    if share and not access.signed_in:
        raise RagPersonaError("--share true: a public link needs a sign-in; give --auth or --admin-auth")
    if access.local_admin and (share or host not in LOCAL_HOSTS):
        raise RagPersonaError("--admin: only on a localhost-only server without --share; use --admin-auth")
    check_personas(list(personas or []), index)
    check_port_free(host, port)
    served = serve_personas(personas, model, adapter, index=index, loader=engine_loader(engine), progress=log)
    app = create_app(served, access=access)
    if host not in LOCAL_HOSTS and not access.signed_in:
        log(f"warning: listening on {host} without --auth: anyone who can reach it can chat")
    log(f"administration: {administration_line(access)}")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    log(f"chat:  http://{shown}:{port}/")
    for line in persona_lines(served):
        log(line)
    models = ", ".join(f"'{pid}'" for pid in served.ids)
    log(f"API:   http://{shown}:{port}/v1/chat/completions (OpenAI-compatible; model {models})")
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    if share:
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started and thread.is_alive():
            time.sleep(0.1)
        log(f"share: {share_link(shown, port)}")
        try:
            thread.join()
        except KeyboardInterrupt:
            server.should_exit = True
            thread.join(5)
        return
    server.run()


def persona_lines(served) -> list[str]:
    """What the startup log says about each persona: its model, adapter and facts; which share a model."""
    slots = {id(slot): i + 1 for i, slot in enumerate(served.models())}
    lines = [
        f"persona {pid}{' (default)' if e is served.default else ''}: {e.persona.name}, "
        f"{len(e.store.facts)} facts, model #{slots[id(e.slot)]} `{e.model_label()}`"
        for pid, e in served.engines.items()
    ]
    if len(served) > 1:
        lines.append(f"{len(slots)} loaded model(s) for {len(served)} personas")
    return lines


def administration_line(access: Access) -> str:
    """What the startup log says about administration (knowledge edits, thresholds, model switch, tuning)."""
    if access.local_admin:
        return "on for everyone who can open the page (--admin, localhost only)"
    if access.admin:
        return f"on for the admin sign-in {access.admin[0]!r}"
    return "off (start with --admin on localhost, or --admin-auth)"


def share_link(host: str, port: int) -> str:
    """A public gradio.live tunnel to the local server (needs internet access)."""
    from gradio import networking

    try:
        return networking.setup_tunnel(host, port, secrets.token_urlsafe(32), None, None)
    except Exception as exc:  # noqa: BLE001 - no network, blocked tunnel: one line, the local server keeps running
        raise RagPersonaError(
            f"--share: could not open a share link ({exc}); the local server is still up"
        ) from None


def register(app: typer.Typer) -> None:
    @app.command("serve")
    @friendly
    def serve_cmd(
        host: Annotated[
            str, typer.Option("--host", help="Interface to bind (0.0.0.0 for every interface).")
        ] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", help="Port for the page and the API.")] = 7860,
        auth: Annotated[
            str | None,
            typer.Option(
                "--auth",
                help="USER:PASS to chat (page sign-in; API clients send 'Bearer USER:PASS'). Visible in ps: "
                f"prefer --auth-file or ${AUTH_ENV}.",
            ),
        ] = None,
        auth_file: Annotated[
            Path | None,
            typer.Option("--auth-file", help=f"A file holding USER:PASS for --auth (or set ${AUTH_ENV})."),
        ] = None,
        admin_auth: Annotated[
            str | None,
            typer.Option(
                "--admin-auth",
                help="USER:PASS of the administrator (knowledge edits, thresholds, model switch, tuning); "
                f"prefer --admin-auth-file or ${ADMIN_AUTH_ENV}.",
            ),
        ] = None,
        admin_auth_file: Annotated[
            Path | None,
            typer.Option(
                "--admin-auth-file", help=f"A file holding USER:PASS for --admin-auth (or ${ADMIN_AUTH_ENV})."
            ),
        ] = None,
        admin: Annotated[
            bool,
            typer.Option(
                "--admin", help="Administration for anyone who opens the page; only with a localhost --host."
            ),
        ] = False,
        model: ModelOpt = None,
        adapter: AdapterOpt = None,
        index: Annotated[
            Path | None,
            typer.Option("--index", help="Index folder (default: the persona's); only with one persona."),
        ] = None,
        persona: Annotated[
            list[str] | None,
            typer.Option(
                "--persona",
                help="Persona to serve: an id under knowledge/ or a persona folder; repeat it to serve several "
                "(the first is the default; API clients pick one by 'model'). Default: the settings' persona. "
                "Personas needing another adapter load another copy of the model (~0.4 GB for the 0.5B Q4).",
            ),
        ] = None,
        share: Annotated[
            str, typer.Option("--share", help="true: also open a public gradio.live link.")
        ] = "false",
        engine: EngineOpt = "auto",
    ) -> None:
        """Start the Gradio chat with the persona(s) and the OpenAI-compatible /v1/chat/completions on one port.

        Administration (knowledge edits, threshold saves, model switch, tuning): --admin-auth or --admin.
        """
        shared = parse_bool(share, "--share")
        access = access_from_options(
            auth=auth,
            auth_file=auth_file,
            admin_auth=admin_auth,
            admin_auth_file=admin_auth_file,
            admin=admin,
            host=host,
            share=shared,
        )
        if auth or admin_auth:
            _progress("note: a password given on the command line is visible to other local users (ps)")
        serve(
            host=host,
            port=port,
            access=access,
            model=model,
            adapter=adapter,
            index=index,
            share=shared,
            engine=engine,
            log=_progress,
            personas=persona,
        )
