"""A small async client for the Kubernetes API calls the operator makes besides kopf's own.

kopf patches the object a handler runs for; the operator also writes other
objects (a pool's children, experiments placed by the pool's pass, the
promoted-adapters ConfigMap). This client uses the same credentials kopf logs
in with (``kopf.ConnectionInfo``: in-cluster service account or KUBECONFIG),
handed over by the login handler.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

from loraplex_api.wire import EXPERIMENT_KIND, EXPERIMENT_PLURAL, POOL_KIND, POOL_PLURAL

logger = logging.getLogger(__name__)

FIELD_MANAGER = "loraplex-operator"
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"


class ApiError(Exception):
    """The API server refused a request: the HTTP status and its Status message."""

    def __init__(self, status: int, method: str, path: str, message: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status


def object_path(
    api_version: str,
    plural: str,
    namespace: str | None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The URL path of a resource collection or object: ``/apis/apps/v1/namespaces/ns/statefulsets/x``."""
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{root}/namespaces/{namespace}/{plural}" if namespace else f"{root}/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


PLURALS = {
    "StatefulSet": "statefulsets",
    "Deployment": "deployments",
    "Service": "services",
    "ConfigMap": "configmaps",
    POOL_KIND: POOL_PLURAL,
    EXPERIMENT_KIND: EXPERIMENT_PLURAL,
}


def path_of(obj: Mapping[str, Any], *, subresource: str | None = None, named: bool = True) -> str:
    """The URL path of a manifest (or of its collection when ``named`` is false)."""
    meta = obj["metadata"]
    name = meta["name"] if named else None
    return object_path(obj["apiVersion"], PLURALS[obj["kind"]], meta.get("namespace"), name, subresource)


class KubeClient:
    """Create, read, merge-patch and server-side apply objects, with the operator's credentials."""

    def __init__(self) -> None:
        self._info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None

    async def connect(self, info: kopf.ConnectionInfo) -> None:
        """Use these credentials from now on (called by the login handler, again on re-login)."""
        self._info = info
        old, self._session = self._session, None
        if old is not None:
            await old.close()
        logger.debug("kubernetes client credentials set server=%s", info.server)

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _open(self) -> tuple[aiohttp.ClientSession, str]:
        if self._info is None:
            raise RuntimeError("the Kubernetes client has no credentials yet (the login handler has not run)")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._info.as_ssl_context()),
                headers={**self._info.as_http_headers(), "User-Agent": FIELD_MANAGER},
                trust_env=self._info.trust_env,
            )
        return self._session, self._info.server.rstrip("/")

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """Send one request; the decoded object, None on 404, ApiError on any other failure."""
        session, server = self._open()
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        async with session.request(
            method, server + path, data=data, headers=headers, params=params
        ) as response:
            text = await response.text()
            if response.status == 404:
                return None
            if response.status >= 400:
                raise ApiError(response.status, method, path, _status_message(text))
            return json.loads(text) if text else {}

    async def get(self, path: str) -> dict[str, Any] | None:
        """Read an object; None if it does not exist."""
        return await self.request("GET", path)

    async def create(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create an object in a collection path."""
        created = await self.request("POST", path, body=obj)
        if created is None:
            raise ApiError(404, "POST", path, "the collection does not exist (is the namespace there?)")
        return created

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any] | None:
        """Merge-patch an object (RFC 7386); None if it does not exist."""
        return await self.request("PATCH", path, body=patch, content_type=MERGE_PATCH)

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply a manifest as the operator's field manager, creating it if it is absent.

        Server-side apply also removes fields the operator set before and no longer renders.
        (An API server creates on apply by itself; the explicit create is for servers that do not.)
        """
        params = {"fieldManager": FIELD_MANAGER, "force": "true"}
        applied = await self.request("PATCH", path_of(obj), body=obj, content_type=APPLY_PATCH, params=params)
        if applied is not None:
            return applied
        return await self.create(path_of(obj, named=False), obj)


def _status_message(text: str) -> str:
    try:
        status = json.loads(text)
    except ValueError:
        return text[:500]
    return (
        str(status.get("message") or status.get("reason") or text[:500])
        if isinstance(status, dict)
        else text[:500]
    )
