"""Who is calling: the one place where both protocols (gRPC metadata, HTTP headers) turn a request's
headers into a caller.

Today a caller is a tenant, named by the `x-tenant-id` header, which salts the prefix-cache hashes so
that no tenant can hit (or time) another's cached prefix. A credential check (bearer tokens mapped to
tenants) belongs in `identify`, raising `Unauthenticated`; the gRPC servicer answers that with
UNAUTHENTICATED and the HTTP API with 401.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Mapping

TENANT_HEADER = "x-tenant-id"
ADMIN_TOKEN_HEADER = "x-admin-token"


class Unauthenticated(Exception):
    """The request carries no valid credentials; the message says what is missing."""


@dataclass(frozen=True)
class Caller:
    tenant: str = ""

    @property
    def cache_salt(self) -> str:
        return f"tenant:{self.tenant}" if self.tenant else ""


def identify(headers: Mapping[str, str]) -> Caller:
    """The caller of a request, from its headers (names in lower case, as gRPC and ASGI give them)."""
    return Caller(tenant=headers.get(TENANT_HEADER, ""))


def check_admin(headers: Mapping[str, str], token: str | None) -> None:
    """Admin calls (mesh.v1.Admin) carry the operator's token in `x-admin-token`; raise
    Unauthenticated unless it equals `token` (None: the gateway has no admin token, admin is off)."""
    if not token:
        raise Unauthenticated("the admin API is off on this gateway: start mesh serve with --admin-token-file")
    given = headers.get(ADMIN_TOKEN_HEADER, "")
    if not given:
        raise Unauthenticated(f"admin calls need the admin token in the {ADMIN_TOKEN_HEADER} metadata")
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthenticated("wrong admin token")
