"""Who is calling: the one place where both protocols (gRPC metadata, HTTP headers) turn a request's
headers into a caller.

Two modes:
- open (no `--auth-tokens-file`): anyone who reaches the port may call; the tenant is whatever the
  `x-tenant-id` header says. The start-up log says so.
- tokens (`--auth-tokens-file FILE`): every call must carry `authorization: Bearer <token>`; the
  token names the tenant and the role. `x-tenant-id` is ignored, so a caller cannot read (or time)
  another tenant's cached prefixes by claiming its name.

The tenant salts the prefix-cache hashes and labels metrics and access-log lines. Roles: `admin`
(may call administrative services) and anything else (e.g. `user`). `require_role` is the check an
administrative service makes; gRPC answers `PermissionDenied` with PERMISSION_DENIED and HTTP with 403.

Token file: one token per line, `TOKEN TENANT [ROLE]` separated by white space (ROLE defaults to
`user`); blank lines and lines starting with `#` are skipped. TOKEN may be written as
`sha256:<64 hex digits>` (the SHA-256 of the token) so that the file need not hold the secret itself.
Tokens are compared by their SHA-256 digests, never as plain strings.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

TENANT_HEADER = "x-tenant-id"
ADMIN_TOKEN_HEADER = "x-admin-token"
AUTH_HEADER = "authorization"
DEFAULT_ROLE = "user"
ADMIN = "admin"
_NAME = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}$")
_SHA = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


class Unauthenticated(Exception):
    """The request carries no valid credentials; the message says what is missing."""


class PermissionDenied(Exception):
    """The caller is known but its role may not do this."""


class TokenFileError(ValueError):
    """The tokens file cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Caller:
    tenant: str = ""
    role: str = ""
    authenticated: bool = False  # False: the server runs open (no tokens file)

    @property
    def cache_salt(self) -> str:
        return f"tenant:{self.tenant}" if self.tenant else ""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """Bearer tokens -> (tenant, role), from a tokens file (see the module docstring)."""

    def __init__(self, entries: Mapping[bytes, tuple[str, str]], source: str = ""):
        if not entries:
            raise TokenFileError(f"{source or 'the tokens file'}: no tokens: every call would be refused")
        self._by_digest = dict(entries)
        self.source = source

    def __len__(self) -> int:
        return len(self._by_digest)

    @classmethod
    def parse(cls, text: str, source: str = "<tokens>") -> "TokenTable":
        entries: dict[bytes, tuple[str, str]] = {}
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) not in (2, 3):
                raise TokenFileError(f"{source}:{n}: expected 'TOKEN TENANT [ROLE]', got {len(parts)} fields")
            token, tenant, role = parts[0], parts[1], parts[2] if len(parts) == 3 else DEFAULT_ROLE
            m = _SHA.match(token)
            if m:
                digest = bytes.fromhex(m.group(1))
            elif len(token) < 16:
                raise TokenFileError(f"{source}:{n}: the token is {len(token)} characters; use at least 16 "
                                     "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
            else:
                digest = _digest(token)
            for what, value in (("tenant", tenant), ("role", role)):
                if not _NAME.match(value):
                    raise TokenFileError(f"{source}:{n}: bad {what} {value!r}: use 1-128 of A-Z a-z 0-9 . _ : @ / -")
            if digest in entries:
                raise TokenFileError(f"{source}:{n}: this token is already listed")
            entries[digest] = (tenant, role)
        return cls(entries, source)

    @classmethod
    def load(cls, path: str | Path) -> "TokenTable":
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise TokenFileError(f"cannot read {path}: {e}") from None
        return cls.parse(text, str(path))

    def lookup(self, token: str) -> tuple[str, str] | None:
        return self._by_digest.get(_digest(token))


def bearer_token(headers: Mapping[str, str]) -> str | None:
    value = headers.get(AUTH_HEADER)
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the authorization header must be 'Bearer <token>'")
    return token.strip()


def identify(headers: Mapping[str, str], tokens: TokenTable | None = None) -> Caller:
    """The caller of a request, from its headers (names in lower case, as gRPC and ASGI give them).
    With `tokens`, a valid bearer token is required (else Unauthenticated) and names the tenant."""
    if tokens is None:
        return Caller(tenant=headers.get(TENANT_HEADER, ""))
    token = bearer_token(headers)
    if token is None:
        raise Unauthenticated("this server requires a bearer token: send the header "
                              "'authorization: Bearer <token>'")
    found = tokens.lookup(token)
    if found is None:
        raise Unauthenticated("the bearer token is not valid here")
    return Caller(tenant=found[0], role=found[1], authenticated=True)


def require_role(caller: Caller, role: str = ADMIN) -> None:
    """Raise PermissionDenied unless `caller` has `role`. A server running open (no tokens file)
    has no roles to check: every caller passes, as before authentication existed (guard such
    services by other means, e.g. their own admin token, or run with --auth-tokens-file)."""
    if not caller.authenticated:
        return
    if caller.role != role:
        raise PermissionDenied(f"tenant {caller.tenant!r} has role {caller.role!r}; this call needs role {role!r}")


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
