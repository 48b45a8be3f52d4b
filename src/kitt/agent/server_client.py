"""The agent's calls to the control plane (register, heartbeat)."""

from __future__ import annotations

from typing import Any

from kitt.agent.config import AgentConfig
from kitt.apiclient import ApiClient
from kitt.errors import ApiError
from kitt.http import TlsFiles, build_client
from kitt.protocol import Heartbeat, HeartbeatResponse, RegisterRequest, RegisterResponse


class AgentUnknownError(ApiError):
    """The server no longer knows this agent id (its database was reset): register again."""


class ServerClient:
    def __init__(self, config: AgentConfig, *, insecure: bool = False) -> None:
        tls = None
        if config.tls is not None:
            tls = TlsFiles(ca=config.tls.ca, cert=config.tls.cert, key=config.tls.key)
        self._api = ApiClient(
            build_client(config.server_url, token=config.token, tls=tls, insecure=insecure)
        )

    def register(self, request: RegisterRequest) -> RegisterResponse:
        return self._api.call("POST", "/api/v1/agents/register", RegisterResponse, request)

    def heartbeat(self, agent_id: str, beat: Heartbeat) -> HeartbeatResponse:
        path = f"/api/v1/agents/{agent_id}/heartbeat"
        try:
            return self._api.call("POST", path, HeartbeatResponse, beat)
        except ApiError as exc:
            if exc.status == 404:
                raise AgentUnknownError(exc.status, exc.message) from exc
            raise

    def post_json(self, path: str, body: dict[str, Any]) -> None:
        """Deliver one spooled report (already a plain JSON object)."""
        self._api.request("POST", path, json_body=body)

    def close(self) -> None:
        self._api.close()
