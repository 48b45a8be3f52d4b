"""``kitt login URL`` / ``kitt logout``: remember a remote server's admin token (0600)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from kitt.errors import ApiError, KittError
from kitt.fleet_client import FleetClient, LoginStore, resolve_server_url
from kitt.paths import agent_paths
from kitt.trust import check_ca_file, fetch_pinned_ca, save_ca


@click.command(cls=click.Command)
@click.argument("url")
@click.option("--token", help="The server's admin token (asked for when omitted).")
@click.option(
    "--ca",
    "ca_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The fleet CA file (from `kitt server ca`) for an https:// server.",
)
@click.option("--ca-fingerprint", help="Fetch the fleet CA from the server and pin it.")
def login(url: str, token: str | None, ca_file: Path | None, ca_fingerprint: str | None) -> None:
    """Check an admin token against a server and remember both for later commands."""
    url = resolve_server_url(url)
    if token is None:
        token = click.prompt("admin token", hide_input=True).strip()
    ca: Path | None = None
    if url.startswith("https://") and (ca_file or ca_fingerprint):
        ca = agent_paths().home / "servers" / (re.sub(r"[^A-Za-z0-9.-]", "_", url) + "-ca.pem")
        if ca_file is not None:
            pem = ca_file.read_bytes()
            check_ca_file(ca_file)
        else:
            assert ca_fingerprint is not None  # noqa: S101
            pem = fetch_pinned_ca(url, ca_fingerprint)
        save_ca(ca, pem)
    try:
        with FleetClient(url, token=token, ca=ca) as fleet:
            count = len(fleet.agents())
    except ApiError as exc:
        if exc.status == 401:
            raise KittError(f"{url} did not accept this admin token") from None
        raise
    LoginStore(agent_paths().login).save(url, token, ca)
    click.echo(f"logged in to {url} ({count} agent(s)); saved in {agent_paths().login} (0600)")


@click.command(cls=click.Command)
@click.argument("url", required=False)
def logout(url: str | None) -> None:
    """Forget the saved token of a server (default: the last one logged in to)."""
    store = LoginStore(agent_paths().login)
    target = resolve_server_url(url) if url else store.default()
    if target is None or not store.forget(target):
        click.echo("not logged in")
        return
    click.echo(f"logged out of {target}")
