"""The local gateway's admin API as the processes of a workspace call it: its bearer token and the
calls that change where traffic goes (``PUT /admin/split``, ``/admin/upstreams``, ``/admin/replicas``).

The token is ``DRIFTLOOP_GATEWAY_TOKEN``; a ``serve`` started without one makes one for itself and its
children and writes it, readable by this user only (0600), to ``<workspace>/serving/gateway.token``,
where the other processes of the same workspace that change traffic find it when the variable is not
set. A later ``serve`` reuses that file's token.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from driftloop.core.errors import ServingError
from driftloop.core.files import workspace_token

__all__ = ["GatewayAdminClient"]

log = logging.getLogger(__name__)


class GatewayAdminClient:
    """Calls a workspace's gateway with its admin token (kept in ``token_path`` when serve made it)."""

    def __init__(self, token_path: Path) -> None:
        self.token_path = token_path
        self._http: Any = None  # one httpx client for every call: making one loads the CA bundle (tens of ms)

    def admin_token(self) -> str | None:
        """The gateway's admin bearer token: ``DRIFTLOOP_GATEWAY_TOKEN``, else the workspace's token file."""
        from serving.gateway_base import ADMIN_TOKEN_ENV

        token = os.environ.get(ADMIN_TOKEN_ENV)
        if token:
            return token
        try:
            return self.token_path.read_text().strip() or None
        except OSError:
            return None

    def ensure_admin_token(self) -> None:
        """A serve without ``DRIFTLOOP_GATEWAY_TOKEN`` makes one for itself, its children and the workspace."""
        from serving.gateway_base import ADMIN_TOKEN_ENV

        if os.environ.get(ADMIN_TOKEN_ENV):
            return
        existed = self.token_path.is_file()
        os.environ[ADMIN_TOKEN_ENV] = workspace_token(self.token_path, ADMIN_TOKEN_ENV)
        log.info("%s is not set: %s the workspace's (%s, mode 0600)", ADMIN_TOKEN_ENV,
                 "using" if existed else "made", self.token_path)

    def call(self, gateway: dict[str, Any], method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One admin call to the gateway of a state entry; ``ServingError`` when it is unreachable or refuses."""
        import httpx

        token = self.admin_token()
        headers = {"authorization": f"Bearer {token}"} if token else {}
        try:
            if self._http is None:
                self._http = httpx.Client(timeout=10.0)
            resp = self._http.request(method, gateway["url"] + path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ServingError(f"gateway at {gateway['url']} is unreachable: {exc}") from exc
        if resp.status_code >= 400:
            raise ServingError(f"gateway refused {path}: {resp.text[:300]}")
        return resp.json()
