"""``kitt agents add``: the exact line to paste on a new GPU machine.

Two forms, both safe over an untrusted network. With the fleet CA copied over, curl
verifies the server. With nothing copied, the line carries two hashes instead: the
install script's SHA-256 (checked before it runs) and the CA's fingerprint (checked by
the script before it trusts the CA); everything after that is verified TLS.
"""

from __future__ import annotations

import json
import shlex

import click

from kitt import pki
from kitt.cli.common import Duration, console, open_fleet, server_option
from kitt.errors import KittError
from kitt.protocol import TokenCreate

INSTALL_PATH = "/api/v1/agent/install.sh"


@click.command()
@server_option
@click.option("--name", help="Name for the new agent (default: its short hostname).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port the new agent listens on.")
@click.option("--service", is_flag=True, help="Install it as a systemd service.")
@click.option(
    "--ttl",
    type=Duration(),
    default="24h",
    show_default=True,
    help="How long the single-use bootstrap token stays valid.",
)
@click.option("--url", help="The server's URL as the new machine reaches it (default: the "
              "URL the server announces, from its --hostname/--ip).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON (token, both lines).")
def add(
    server_url: str | None,
    name: str | None,
    port: int | None,
    service: bool,
    ttl: float,
    url: str | None,
    as_json: bool,
) -> None:
    """Print the one-line install for a new GPU machine, with a fresh single-use
    bootstrap token and the fleet CA's fingerprint."""
    if name is not None:
        from kitt.cli.agents import _name

        _name(name)
    with open_fleet(server_url) as fleet:
        info = fleet.agent_package()
        base = (url or info.server_url).rstrip("/")
        fingerprint = None
        if base.startswith("https://"):
            try:
                fingerprint = pki.single_ca_pem(fleet.ca_pem())[1]
            except pki.PkiError as exc:
                raise KittError(f"the server's CA certificate is not usable: {exc}") from None
        created = fleet.create_token(
            TokenCreate(ttl_s=ttl, uses=1, note=f"kitt agents add {name or ''}".strip())
        )
    # The script's own default server is what the server announces; --url must win.
    args = ["--server", base]
    args += ["--name", name] if name else []
    args += ["--port", str(port)] if port else []
    args += ["--service"] if service else []
    tail = " ".join(shlex.quote(a) for a in args)
    script = shlex.quote(base + INSTALL_PATH)
    # The token rides in bash's environment, which only its user can read, not on its
    # command line, which every user of the machine can (ps, /proc/PID/cmdline).
    env = f"KITT_BOOTSTRAP_TOKEN={shlex.quote(created.token)}"
    lines: dict[str, str] = {}
    if fingerprint is None:
        lines["plain"] = f"curl -fsS {script} | {env} bash -s -- {tail}"
    else:
        lines["cacert"] = (
            f"curl -fsS --cacert ca.pem {script} | {env} bash -s -- --cacert ca.pem {tail}"
        )
        lines["fingerprint"] = (
            f"curl -fsSk {script} -o kitt-install.sh && "
            f"echo '{info.install_sh_sha256}  kitt-install.sh' | sha256sum -c --quiet && "
            f"{env} bash kitt-install.sh --ca-fingerprint {fingerprint} {tail}"
        )
    if as_json:
        body = {
            "token_id": created.id,
            "token": created.token,
            "expires_at": created.expires_at.isoformat(),
            "server_url": base,
            "ca_fingerprint": fingerprint,
            "version": info.version,
            **lines,
        }
        click.echo(json.dumps(body, indent=2))
        return
    out = console.print
    until = f"{created.expires_at:%Y-%m-%d %H:%M} UTC"
    out(f"bootstrap token {created.id}: single use, valid until {until}; installs kitt "
        f"{info.version}", highlight=False)  # fmt: skip
    if fingerprint is None:
        out("[yellow]this server is plain HTTP: use it only on a network you trust[/]")
        out("on the new machine, run:", highlight=False)
        click.echo(f"  {lines['plain']}")
        return
    out("on the new machine, with the fleet CA copied there as ca.pem (kitt server ca > ca.pem):")
    click.echo(f"  {lines['cacert']}")
    out("or, with nothing to copy (the script and the CA are checked by their SHA-256):")
    click.echo(f"  {lines['fingerprint']}")
