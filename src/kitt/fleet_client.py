"""The user's client for the server's fleet API, and how it finds the server."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import httpx_sse

from kitt.apiclient import ApiClient
from kitt.errors import ApiError, KittError
from kitt.http import build_client, error_message
from kitt.paths import ServerPaths
from kitt.protocol import AgentDetail, AgentSummary, HeartbeatRecord, TestInfo, TestRequest
from kitt.urls import validate_server_url


def resolve_server_url(flag: str | None) -> str:
    """``--server``, else ``KITT_SERVER``, else the server running under this KITT_HOME."""
    for candidate in (flag, os.environ.get("KITT_SERVER")):
        if candidate:
            try:
                return validate_server_url(candidate)
            except ValueError as exc:
                raise KittError(str(exc)) from None
    endpoint = ServerPaths.default().endpoint
    try:
        return str(json.loads(endpoint.read_text())["url"])
    except (OSError, ValueError, KeyError, TypeError):
        raise KittError(
            "no server given: pass --server URL or set KITT_SERVER "
            f"(and no local server found at {endpoint})"
        ) from None


class FleetClient:
    def __init__(self, server_url: str, *, insecure: bool = False) -> None:
        self._api = ApiClient(build_client(server_url, insecure=insecure))

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
                        yield sse.event, data
                        if sse.event == "end":
                            return
            except httpx.TransportError:
                time.sleep(1)  # a blip: reconnect and resume after the last line seen

    def log_text(self, test_id: str) -> list[str]:
        response = self._api.request("GET", f"/api/v1/tests/{test_id}/logs?format=text")
        return response.text.splitlines()

    def cancel(self, test_id: str) -> TestInfo:
        return self._api.call("POST", f"/api/v1/tests/{test_id}/cancel", TestInfo)

    def remove(self, id_or_name: str) -> dict[str, Any]:
        body: dict[str, Any] = self._api.json("DELETE", f"/api/v1/agents/{id_or_name}")
        return body
