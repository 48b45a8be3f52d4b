"""The agent's calls to the control plane (register, heartbeat, reports, renewal)."""

from __future__ import annotations

import ssl
from typing import Any

from kitt.agent.config import AgentConfig
from kitt.apiclient import ApiClient
from kitt.errors import ApiError
from kitt.http import TlsFiles, build_client
from kitt.protocol import Heartbeat, HeartbeatResponse, RegisterRequest, RegisterResponse


class AgentUnknownError(ApiError):
    """The server no longer knows this agent id (its database was reset): register again."""


def tls_files(config: AgentConfig) -> TlsFiles | None:
    if config.tls is None:
        return None
    return TlsFiles(ca=config.tls.ca, cert=config.tls.cert, key=config.tls.key)


class ServerClient:
    def __init__(self, config: AgentConfig, *, insecure: bool = False) -> None:
        self.tls = tls_files(config)
        # One context for the life of the client: a renewed certificate is loaded into
        # it (reload_cert), and new connections present it.
        self._ssl: ssl.SSLContext | None = None
        if self.tls is not None and config.server_url.startswith("https://"):
            self._ssl = self.tls.client_context(verify=not insecure)
        self._api = ApiClient(
            build_client(config.server_url, token=config.token, ssl_context=self._ssl)
        )

    def set_token(self, token: str) -> None:
        self._api.http.headers["Authorization"] = f"Bearer {token}"

    def reload_cert(self) -> None:
        if self._ssl is not None and self.tls is not None and self.tls.cert and self.tls.key:
            self._ssl.load_cert_chain(str(self.tls.cert), str(self.tls.key))

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
