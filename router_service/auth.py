"""Who is calling: the one place where both protocols (gRPC metadata, HTTP headers) turn a request's
headers into a caller.

Today a caller is a tenant, named by the `x-tenant-id` header, which salts the prefix-cache hashes so
that no tenant can hit (or time) another's cached prefix. A credential check (bearer tokens mapped to
tenants) belongs in `identify`, raising `Unauthenticated`; the gRPC servicer answers that with
UNAUTHENTICATED and the HTTP API with 401.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

TENANT_HEADER = "x-tenant-id"


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
