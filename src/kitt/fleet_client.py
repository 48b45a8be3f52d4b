"""The user's client for the server's fleet API, and how it finds the server."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import httpx_sse
from pydantic import ValidationError

from kitt.apiclient import ApiClient
from kitt.errors import ApiError, KittError, ServerError
from kitt.http import TlsFiles, build_client, error_message
from kitt.paths import ServerPaths, agent_paths, write_private
from kitt.protocol import (
    TERMINAL_STATUSES,
    AgentDetail,
    AgentPackageInfo,
    AgentSettingsView,
    AgentSummary,
    HeartbeatRecord,
    ResultDetail,
    ResultImported,
    ResultRow,
    TestInfo,
    TestRequest,
    TokenCreate,
    TokenCreated,
    TokenInfo,
)
from kitt.server.admin_token import read_admin_token
from kitt.urls import validate_server_url


def _local_endpoint() -> dict[str, Any] | None:
    try:
        data = json.loads(ServerPaths.default().endpoint.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("url"), str) else None


def resolve_server_url(flag: str | None) -> str:
    """``--server``, else ``KITT_SERVER``, else the server running under this KITT_HOME,
    else the server of the last ``kitt login``."""
    for candidate in (flag, os.environ.get("KITT_SERVER")):
        if candidate:
            try:
                return validate_server_url(candidate)
            except ValueError as exc:
                raise KittError(str(exc)) from None
    local = _local_endpoint()
    if local is not None:
        return str(local["url"])
    default = LoginStore(agent_paths().login).default()
    if default:
        return default
    raise KittError(
        "no server given: pass --server URL or set KITT_SERVER, or run `kitt login URL` "
        f"(and no local server found at {ServerPaths.default().endpoint})"
    )


@dataclass(frozen=True)
class Target:
    """A server and what it takes to talk to it as a user."""

    url: str
    token: str | None
    ca: Path | None


def resolve_target(server_flag: str | None, token_flag: str | None) -> Target:
    """Where the admin token and the CA come from, in order: ``--token``/``KITT_TOKEN``;
    the local server's own files when the URL is that server's; ``kitt login``."""
    url = resolve_server_url(server_flag)
    token = token_flag or os.environ.get("KITT_TOKEN") or None
    ca_env = os.environ.get("KITT_CA")
    ca = Path(ca_env) if ca_env else None
    local = _local_endpoint()
    if local is not None and url in (local["url"], local.get("public_url")):
        if token is None:
            token = read_admin_token(ServerPaths.default().admin_token)
        if ca is None and isinstance(local.get("ca"), str):
            ca = Path(local["ca"])
    saved = LoginStore(agent_paths().login).get(url)
    if saved is not None:
        token = token or saved.get("token")
        if ca is None and saved.get("ca"):
            ca = Path(saved["ca"])
    return Target(url=url, token=token, ca=ca)


class LoginStore:
    """``kitt login``'s memory: per server URL its admin token and CA file (0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            return {"servers": {}}
        except (OSError, ValueError) as exc:
            raise KittError(f"cannot read {self.path}: {exc}; delete it and log in again") from exc
        return data if isinstance(data, dict) else {"servers": {}}

    def get(self, url: str) -> dict[str, Any] | None:
        entry = self._read().get("servers", {}).get(url)
        return entry if isinstance(entry, dict) else None

    def default(self) -> str | None:
        value = self._read().get("default")
        return value if isinstance(value, str) else None

    def save(self, url: str, token: str, ca: Path | None) -> None:
        data = self._read()
        data.setdefault("servers", {})[url] = {"token": token, "ca": str(ca) if ca else None}
        data["default"] = url
        write_private(self.path, json.dumps(data, indent=2))

    def forget(self, url: str) -> bool:
        data = self._read()
        gone = data.get("servers", {}).pop(url, None) is not None
        if data.get("default") == url:
            data.pop("default")
        write_private(self.path, json.dumps(data, indent=2))
        return gone


def connect(server_flag: str | None, token_flag: str | None = None) -> FleetClient:
    """A fleet client for the CLI, with the server, token and CA resolved."""
    target = resolve_target(server_flag, token_flag)
    return FleetClient(target.url, token=target.token, ca=target.ca)


class FleetClient:
    def __init__(
        self,
        server_url: str,
        *,
        token: str | None = None,
        ca: Path | None = None,
        insecure: bool = False,
    ) -> None:
        self._api = ApiClient(
            build_client(server_url, token=token, tls=TlsFiles(ca=ca), insecure=insecure)
        )

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._api.close()

    def agents(self) -> list[AgentSummary]:
        body: Any = self._api.json("GET", "/api/v1/agents")
        return [AgentSummary.model_validate(a) for a in body["agents"]]

    def agent(self, id_or_name: str) -> AgentDetail:
        return self._api.call("GET", f"/api/v1/agents/{id_or_name}", AgentDetail)

    def heartbeats(self, id_or_name: str, limit: int) -> list[HeartbeatRecord]:
        body: Any = self._api.json("GET", f"/api/v1/agents/{id_or_name}/heartbeats?limit={limit}")
        return [HeartbeatRecord.model_validate(h) for h in body["heartbeats"]]

    def agent_settings(self, id_or_name: str) -> AgentSettingsView:
        return self._api.call("GET", f"/api/v1/agents/{id_or_name}/settings", AgentSettingsView)

    def set_agent_settings(self, id_or_name: str, changes: dict[str, Any]) -> AgentSettingsView:
        """Set the given keys (``None``: back to the default); the rest stay as they are."""
        path = f"/api/v1/agents/{id_or_name}/settings"
        response = self._api.request("PATCH", path, json_body=changes)
        try:
            return AgentSettingsView.model_validate_json(response.content)
        except ValidationError as exc:
            raise ServerError(f"unexpected answer to the settings change: {exc}") from exc

    def submit(self, request: TestRequest) -> TestInfo:
        return self._api.call("POST", "/api/v1/tests", TestInfo, request)

    def test(self, test_id: str) -> TestInfo:
        return self._api.call("GET", f"/api/v1/tests/{test_id}", TestInfo)

    def tests(self, status: str | None, agent: str | None, limit: int) -> list[TestInfo]:
        query = httpx.QueryParams({k: v for k, v in
                                   {"status": status, "agent": agent, "limit": limit}.items()
                                   if v is not None})  # fmt: skip
        body: Any = self._api.json("GET", f"/api/v1/tests?{query}")
        return [TestInfo.model_validate(t) for t in body["tests"]]

    def log_events(self, test_id: str, after: int = 0) -> Iterator[tuple[str, dict[str, Any]]]:
        """The test's log as (event, data) pairs over SSE; resumes after a dropped connection."""
        last = after
        while True:
            headers = {"Last-Event-ID": str(last)} if last else {}
            try:
                with httpx_sse.connect_sse(
                    self._api.http, "GET", f"/api/v1/tests/{test_id}/logs",
                    headers=headers, timeout=httpx.Timeout(10, read=60),
                ) as source:  # fmt: skip
                    if source.response.status_code >= 400:
                        source.response.read()
                        raise ApiError(source.response.status_code, error_message(source.response))
                    for sse in source.iter_sse():
                        if not sse.data:
                            continue  # the retry hint carries no data
                        data = sse.json()
                        if sse.event == "log":
                            last = int(data["seq"])
                        if sse.event == "end" and data.get("status") not in TERMINAL_STATUSES:
                            # A stopping server ends every stream, the test still going:
                            # like a blip, reconnect and resume after the last line seen.
                            break
                        yield sse.event, data
                        if sse.event == "end":
                            return
            except httpx.TransportError:
                pass
            time.sleep(1)  # before reconnecting (a blip, or a server restarting)

    def log_text(self, test_id: str) -> list[str]:
        response = self._api.request("GET", f"/api/v1/tests/{test_id}/logs?format=text")
        return response.text.splitlines()

    def cancel(self, test_id: str) -> TestInfo:
        return self._api.call("POST", f"/api/v1/tests/{test_id}/cancel", TestInfo)

    def remove(self, id_or_name: str) -> dict[str, Any]:
        body: dict[str, Any] = self._api.json("DELETE", f"/api/v1/agents/{id_or_name}")
        return body

    def revoke(self, id_or_name: str) -> dict[str, Any]:
        body: dict[str, Any] = self._api.json("POST", f"/api/v1/agents/{id_or_name}/revoke")
        return body

    def agent_package(self) -> AgentPackageInfo:
        return self._api.call("GET", "/api/v1/agent/package.json", AgentPackageInfo)

    def ca_pem(self) -> bytes:
        return self._api.request("GET", "/api/v1/ca.pem").content

    def create_token(self, request: TokenCreate) -> TokenCreated:
        return self._api.call("POST", "/api/v1/tokens", TokenCreated, request)

    def tokens(self) -> list[TokenInfo]:
        body: Any = self._api.json("GET", "/api/v1/tokens")
        return [TokenInfo.model_validate(t) for t in body["tokens"]]

    def revoke_token(self, token_id: str) -> TokenInfo:
        return self._api.call("DELETE", f"/api/v1/tokens/{token_id}", TokenInfo)

    # --- results (kitt results …) ----------------------------------------------------------

    def results(
        self,
        *,
        agent: str | None = None,
        model: str | None = None,
        engine: str | None = None,
        gpu: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[ResultRow]:
        """Stored results, newest first: their indexed fields, no documents."""
        filters: dict[str, Any] = {"agent": agent, "model": model, "engine": engine, "gpu": gpu,
                                   "since": since.isoformat() if since else None,
                                   "until": until.isoformat() if until else None,
                                   "limit": limit, "offset": offset}  # fmt: skip
        query = httpx.QueryParams({k: v for k, v in filters.items() if v is not None})
        body: Any = self._api.json("GET", f"/api/v1/results?{query}")
        return [ResultRow.model_validate(r) for r in body["results"]]

    def result(self, result_id: str) -> ResultDetail:
        return self._api.call("GET", f"/api/v1/results/{result_id}", ResultDetail)

    def import_result(self, document: dict[str, Any]) -> ResultImported:
        response = self._api.request("POST", "/api/v1/results", json_body=document)
        try:
            return ResultImported.model_validate_json(response.content)
        except ValidationError as exc:
            raise ServerError(f"unexpected answer to the import: {exc.errors()[0]['msg']}") from exc

    def delete_result(self, result_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self._api.json("DELETE", f"/api/v1/results/{result_id}")
        return body
