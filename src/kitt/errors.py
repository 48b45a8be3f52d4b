"""Typed errors. Inside KITT code raises these; the CLI turns them into one clear line."""

from __future__ import annotations


class KittError(Exception):
    """Base for every error KITT reports to a user. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class ConfigError(KittError):
    """A config file is missing, unreadable or invalid (exit 2: the operator must act)."""

    exit_code = 2


class NotConfiguredError(ConfigError):
    """There is no agent.yaml yet."""


class HomeNotWritableError(KittError):
    """KITT_HOME (or a folder in it) cannot be created or written."""


class AlreadyRunningError(KittError):
    """A daemon of this kind already holds the pid file."""


class DaemonStartError(KittError):
    """A daemon failed before it was ready (bind error, bad database, ...)."""


class NotRunningError(KittError):
    """There is no daemon to stop."""

    exit_code = 3


class ServerError(KittError):
    """Talking to the KITT server failed."""


class ServerUnreachableError(ServerError):
    """No HTTP answer at all: connection refused, DNS, timeout, TLS."""


class ApiError(ServerError):
    """The server answered with a 4xx/5xx; ``status`` and the server's message are kept."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"server answered {status}: {message}")
        self.status = status
        self.message = message


class ServiceError(KittError):
    """Installing or controlling the systemd unit failed."""
