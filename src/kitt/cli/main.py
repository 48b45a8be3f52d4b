"""Entry points: ``kitt`` (everything) and ``kitt-agent`` (exactly ``kitt agent``)."""

from __future__ import annotations

import click

from kitt import __version__
from kitt.cli.agent import agent
from kitt.cli.agent_update import activate, update
from kitt.cli.agents import agents
from kitt.cli.agents_add import add
from kitt.cli.bench import bench
from kitt.cli.common import KittGroup
from kitt.cli.demo import demo
from kitt.cli.login import login, logout
from kitt.cli.results import results_group
from kitt.cli.server import server
from kitt.cli.tests import test_group


@click.group(cls=KittGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="kitt")
def cli() -> None:
    """KITT: benchmark LLM inference across a fleet of GPU machines."""


agent.add_command(update)
agent.add_command(activate)
agents.add_command(add)

cli.add_command(server)
cli.add_command(agent)
cli.add_command(agents)
cli.add_command(test_group)
cli.add_command(results_group)
cli.add_command(bench)
cli.add_command(demo)
cli.add_command(login)
cli.add_command(logout)


def main() -> None:
    cli(prog_name="kitt")


def agent_main() -> None:
    agent(prog_name="kitt-agent", help_option_names=["-h", "--help"])
