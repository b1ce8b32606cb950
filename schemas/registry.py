"""A minimal Confluent Schema Registry client over urllib (no extra dependency).

Only what the codec needs: register a schema under a subject and fetch a schema
by id, both cached for the life of the client (ids and schemas never change
once assigned). Credentials may be embedded in the URL
(``https://user:secret@registry:8081``); they are sent as HTTP Basic auth and
never appear in error messages.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class RegistryError(RuntimeError):
    """A registry request failed; ``status`` is the HTTP status (None if no answer)."""

    def __init__(
        self, message: str, status: int | None = None, error_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


class NotAvroSchema(RegistryError):
    """The registry holds the id, but as another schema type (JSON, PROTOBUF): a fact about
    the record that carries the id, not a registry failure; asking again will not help."""

    def __init__(self, message: str, schema_type: str) -> None:
        super().__init__(message, status=200)
        self.schema_type = schema_type


class SchemaRegistry:
    """Client for ``POST /subjects/{subject}/versions`` and ``GET /schemas/ids/{id}``."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("schema registry URL must be http(s)://host[:port][/path]")
        netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        # without the credentials: this is the URL error messages show
        self.base_url = urllib.parse.urlunsplit(
            (parts.scheme, netloc, parts.path.rstrip("/"), "", "")
        )
        self._auth: str | None = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            self._auth = f"Basic {token}"
        self.timeout = timeout
        self._ids: dict[tuple[str, str], int] = {}
        self._schemas: dict[int, str] = {}

    def register(self, subject: str, schema_json: str) -> int:
        """Register ``schema_json`` (Avro) under ``subject``; return its global id.

        Registering an identical schema again returns the existing id. Raises
        :class:`RegistryError` on any HTTP or network failure (e.g. 409 when the
        subject's compatibility rule rejects the schema).
        """
        key = (subject, schema_json)
        cached = self._ids.get(key)
        if cached is not None:
            return cached
        path = f"/subjects/{urllib.parse.quote(subject, safe='')}/versions"
        body = self._request("POST", path, {"schema": schema_json})
        schema_id = body.get("id")
        if not isinstance(schema_id, int):
            raise RegistryError(f"schema registry POST {self.base_url}{path}: no id in answer")
        self._ids[key] = schema_id
        self._schemas.setdefault(schema_id, schema_json)
        return schema_id

    def schema_by_id(self, schema_id: int) -> str:
        """The schema JSON registered under ``schema_id``.

        Raises :class:`RegistryError` (status 404 for an unknown id) on failure,
        and :class:`NotAvroSchema` when the schema is not an Avro schema.
        """
        cached = self._schemas.get(schema_id)
        if cached is not None:
            return cached
        path = f"/schemas/ids/{int(schema_id)}"
        body = self._request("GET", path, None)
        schema = body.get("schema")
        schema_type = body.get("schemaType", "AVRO")
        if not isinstance(schema, str) or schema_type != "AVRO":
            raise NotAvroSchema(
                f"schema registry GET {self.base_url}{path}: not an Avro schema ({schema_type})",
                str(schema_type),
            )
        self._schemas[schema_id] = schema
        return schema

    def _request(self, method: str, path: str, payload: dict[str, Any] | None) -> dict[str, Any]:
        url = self.base_url + path
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", f"{CONTENT_TYPE}, application/json")
        if data is not None:
            req.add_header("Content-Type", CONTENT_TYPE)
        if self._auth is not None:
            req.add_header("Authorization", self._auth)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                answer = json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            message, code = _error_body(exc)
            raise RegistryError(
                f"schema registry {method} {url} failed: HTTP {exc.code} {message}",
                status=exc.code,
                error_code=code,
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            # `from None`: urllib's own exception text can repeat the request URL
            raise RegistryError(f"schema registry {method} {url} failed: {_reason(exc)}") from None
        if not isinstance(answer, dict):
            raise RegistryError(f"schema registry {method} {url}: answer is not a JSON object")
        return answer


def _error_body(exc: urllib.error.HTTPError) -> tuple[str, int | None]:
    """The registry's ``{"error_code", "message"}`` body, or the HTTP reason."""
    try:
        body = json.loads(exc.read() or b"{}")
    except ValueError:
        return str(exc.reason), None
    if not isinstance(body, dict):
        return str(exc.reason), None
    code = body.get("error_code")
    return str(body.get("message") or exc.reason), code if isinstance(code, int) else None


def _reason(exc: Exception) -> str:
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return f"{type(exc).__name__}: {exc}"
