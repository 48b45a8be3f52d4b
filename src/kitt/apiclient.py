"""A JSON-over-HTTP client that turns transport and HTTP failures into typed errors.

The agent's server client and the user's fleet client both sit on this, so "server
unreachable" and "server said 4xx" mean the same thing everywhere.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from kitt.errors import ApiError, ServerError, ServerUnreachableError
from kitt.http import error_message

M = TypeVar("M", bound=BaseModel)


class ApiClient:
    def __init__(self, client: httpx.Client, *, tls_name: str | None = None) -> None:
        """``tls_name``: the name the peer's certificate must carry when it differs from the
        host in the URL (agents are reached by address; their certificates name them)."""
        self.http = client
        self.extensions = {"sni_hostname": tls_name} if tls_name else None

    @property
    def base_url(self) -> str:
        return str(self.http.base_url).rstrip("/")

    def request(
        self, method: str, path: str, body: BaseModel | None = None, json_body: Any = None
    ) -> httpx.Response:
        content = body.model_dump_json().encode() if body is not None else None
        if json_body is not None:
            content = json.dumps(json_body).encode()
        headers = {"Content-Type": "application/json"} if content is not None else None
        try:
            response = self.http.request(
                method, path, content=content, headers=headers, extensions=self.extensions
            )
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            raise ServerUnreachableError(f"cannot reach {self.base_url}: {reason}") from exc
        if response.status_code >= 400:
            raise ApiError(response.status_code, error_message(response))
        return response

    def call(self, method: str, path: str, model: type[M], body: BaseModel | None = None) -> M:
        response = self.request(method, path, body)
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise ServerError(
                f"{self.base_url}{path} answered with an unexpected body: {exc.errors()[0]['msg']}"
            ) from exc

    def json(self, method: str, path: str) -> Any:
        response = self.request(method, path)
        try:
            return response.json()
        except ValueError as exc:
            raise ServerError(f"{self.base_url}{path} did not answer with JSON") from exc

    def close(self) -> None:
        self.http.close()
