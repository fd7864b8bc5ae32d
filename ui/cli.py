"""`rag-persona serve`: the Gradio app and the OpenAI-compatible API on one port, registered by entry point."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

from rag_persona.cli import _progress, friendly
from rag_persona.errors import RagPersonaError
from rag_persona.generation.engines import ENGINE_HELP


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if value is None or value == "":
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise RagPersonaError("--auth: expected USER:PASS (both non-empty)")
    return user, password


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
    model: str | None = None,
    adapter: str | None = None,
    index: str | Path | None = None,
    share: bool = False,
    engine: str = "auto",
    log=print,
) -> None:
    """Load the engine, build the app, and serve it with uvicorn until interrupted."""
    # here, not at the top: uvicorn, gradio and torch would slow every other rag-persona command
    import uvicorn

    from .app import create_app
    from .engine import Engine
    from .loading import engine_loader

    check_port_free(host, port)
    chat = Engine(model, adapter, index=index, loader=engine_loader(engine), progress=log)
    app = create_app(chat, auth=auth)
    if host not in ("127.0.0.1", "localhost", "::1") and auth is None:
        log(
            f"warning: listening on {host} without --auth: anyone who can reach it can chat and edit knowledge"
        )
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    log(f"chat:  http://{shown}:{port}/")
    log(f"API:   http://{shown}:{port}/v1/chat/completions (OpenAI-compatible; model '{chat.persona.id}')")
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
            typer.Option("--auth", help="USER:PASS for the page; API clients send 'Bearer USER:PASS'."),
        ] = None,
        model: Annotated[
            str | None, typer.Option("--model", help="Bundled alias, hub id or local folder.")
        ] = None,
        adapter: Annotated[
            str | None,
            typer.Option(
                "--adapter", help="A peft adapter folder ('none': base model; default: the chat's)."
            ),
        ] = None,
        index: Annotated[
            Path | None, typer.Option("--index", help="Index folder (default: the persona's).")
        ] = None,
        share: Annotated[
            str, typer.Option("--share", help="true: also open a public gradio.live link.")
        ] = "false",
        engine: Annotated[str, typer.Option("--engine", help=ENGINE_HELP)] = "auto",
    ) -> None:
        """Start the Gradio chat with the persona and the OpenAI-compatible /v1/chat/completions on one port."""
        serve(
            host=host,
            port=port,
            auth=parse_auth(auth),
            model=model,
            adapter=adapter,
            index=index,
            share=parse_bool(share, "--share"),
            engine=engine,
            log=_progress,
        )
