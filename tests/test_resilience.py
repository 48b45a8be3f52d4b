"""The agent keeps going through server outages and a wiped server database."""

from __future__ import annotations

from conftest import Kitt, wait_for


def test_agent_started_before_server_keeps_retrying_then_registers(kitt: Kitt) -> None:
    kitt.start_server()
    kitt.init_agent("early")  # takes a bootstrap token from the local server
    kitt.run("server", "stop", check=True)
    started = kitt.run("agent", "start", check=True)  # no server yet: the start must succeed
    assert "not registered yet (cannot reach" in started.stdout
    status = wait_for(
        lambda: (s := kitt.agent_status())["last_error"] and s, what="a failed registration"
    )
    assert status["registered"] is False and status["agent_id"] is None
    assert "cannot reach" in status["last_error"]
    cli = kitt.run("agent", "status")
    assert cli.returncode == 0
    assert "not registered yet" in cli.stdout and "cannot reach" in cli.stdout

    kitt.start_server()
    agent = wait_for(lambda: kitt.agent("early"), what="registration once the server is up")
    assert agent["online"] is True
    wait_for(lambda: kitt.agent_status()["last_error"] is None, what="agent error cleared")
    wait_for(lambda: len(kitt.heartbeats("early")) >= 2, what="heartbeats after late registration")


def test_agent_recovers_from_server_outage_without_restart(kitt: Kitt) -> None:
    kitt.start_server()
    kitt.init_agent("steady")
    kitt.run("agent", "start", check=True)
    agent_pid = kitt.pid_of("agent")
    wait_for(lambda: len(kitt.heartbeats("steady")) >= 2, what="heartbeats before outage")
    agent_id = kitt.agent("steady")["id"]

    kitt.run("server", "stop", check=True)
    wait_for(lambda: kitt.agent_status()["last_error"], what="agent noticing the outage")
    before = kitt.agent_status()["last_heartbeat_ok"]

    kitt.start_server()
    wait_for(
        lambda: kitt.agent_status()["last_heartbeat_ok"] != before, what="heartbeat after outage"
    )
    assert kitt.pid_of("agent") == agent_pid  # same process: recovered, not restarted
    assert kitt.agent("steady")["id"] == agent_id  # same identity: no duplicate agent
    assert [a["name"] for a in kitt.agents()] == ["steady"]
    log = (kitt.home / "agent.log").read_text()
    # One warning for the whole outage, not one per retry.
    assert log.count("heartbeat failed") + log.count("registration failed") == 1
    assert "server reachable again" in log


def test_agent_registers_again_after_server_database_is_wiped(kitt: Kitt) -> None:
    kitt.start_server("--no-auth")  # without tokens, the agent's own re-registration path
    kitt.init_agent("phoenix")
    kitt.run("agent", "start", check=True)
    old_id = wait_for(lambda: kitt.agent("phoenix").get("id"), what="first registration")

    kitt.run("server", "stop", check=True)
    for suffix in ("", "-wal", "-shm"):
        (kitt.home / "server" / f"kitt.db{suffix}").unlink(missing_ok=True)
    kitt.start_server("--no-auth")

    new = wait_for(lambda: kitt.agent("phoenix"), what="re-registration with the empty database")
    assert new["id"] != old_id
    wait_for(lambda: kitt.agent_status()["agent_id"] == new["id"], what="agent adopting the new id")
    wait_for(lambda: len(kitt.heartbeats("phoenix")) >= 2, what="heartbeats under the new id")
    assert "registering again" in (kitt.home / "agent.log").read_text()


def test_wiped_database_with_auth_asks_for_enrollment_then_recovers(kitt: Kitt) -> None:
    """A wiped server forgets every agent token: the agent says so, and re-enrolling with a
    new bootstrap token brings it back under the same name."""
    kitt.start_server()
    kitt.init_agent("phoenix")
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent("phoenix").get("id"), what="first registration")
    kitt.run("server", "stop", check=True)
    for suffix in ("", "-wal", "-shm"):
        (kitt.home / "server" / f"kitt.db{suffix}").unlink(missing_ok=True)
    kitt.start_server()
    status = wait_for(
        lambda: "401" in ((s := kitt.agent_status())["last_error"] or "") and s,
        what="the agent reporting its token refused",
    )
    assert "agent token not accepted" in status["last_error"]
    assert "kitt-agent init --server URL --token" in status["last_error"]
    assert kitt.agents() == []  # nothing was registered with the dead token

    kitt.run("agent", "stop", check=True)
    kitt.run("agent", "init", "--server", kitt.server_url, "--token", kitt.bootstrap_token(),
             check=True)  # fmt: skip
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent("phoenix").get("online"), what="registration after re-enrolling")
