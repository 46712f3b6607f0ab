"""Bearer tokens: per tenant (optional) and for the admin endpoints.

Tokens are kept only as sha256 digests and compared with `hmac.compare_digest` on digests of equal
length, so a comparison takes the same time whatever the guess. No token is ever logged: the access
log records only whether a request carried one. A tenant's token opens that tenant only; the admin
token opens every tenant and /admin/*.
"""
from __future__ import annotations

import hashlib
import hmac

from mmft.serve.inputs import ServeError


def presented_digest(authorization: str | None) -> bytes | None:
    """sha256 of the token in an 'Authorization: Bearer <token>' header, or None when there is none."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ServeError(401, "unauthorized", "the Authorization header must look like 'Bearer <token>'")
    return hashlib.sha256(token.strip().encode()).digest()


def _matches(presented: bytes | None, expected: bytes | None) -> bool:
    return presented is not None and expected is not None and hmac.compare_digest(presented, expected)


def may_access(tenant, presented: bytes | None, admin: bytes | None) -> bool:
    """True when a request carrying `presented` may query `tenant`."""
    if tenant.token_digest is None:
        return True
    return _matches(presented, tenant.token_digest) | _matches(presented, admin)  # both compared, always


def require_tenant(tenant, presented: bytes | None, admin: bytes | None) -> None:
    if may_access(tenant, presented, admin):
        return
    if presented is None:
        raise ServeError(401, "unauthorized", f"tenant '{tenant.name}' needs a bearer token: send "
                         "'Authorization: Bearer <token>'")
    raise ServeError(403, "forbidden", f"this token does not open tenant '{tenant.name}'; use that tenant's "
                     "own token")


def require_admin(presented: bytes | None, admin: bytes | None) -> None:
    if admin is None:
        raise ServeError(403, "forbidden",
                         "admin endpoints are off: set auth.admin_token in the serve config")
    if presented is None:
        raise ServeError(401, "unauthorized", "admin endpoints need the admin token: send "
                         "'Authorization: Bearer <admin token>'")
    if not _matches(presented, admin):
        raise ServeError(403, "forbidden", "this token is not the admin token")
