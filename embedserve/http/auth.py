"""The API key check: `Authorization: Bearer <key>`, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import Request

from embedserve.http.errors import ClientError

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="embedserve"'}


def check_api_key(request: Request, key: str | None, required: bool = False) -> None:
    """Raise a 401 ClientError unless the request carries `Authorization: Bearer <key>`.

    Without a configured key the reading endpoints are open (`required=False`). The comparison
    takes the same time wherever the first wrong byte is (hmac.compare_digest), and the error
    never repeats what was sent."""
    if key is None and not required:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if key is not None and scheme.lower() == "bearer":
        # digests of equal length: not even the key's length shows in the timing
        if hmac.compare_digest(_digest(token.strip()), _digest(key)):
            return
        problem = "wrong API key"
    else:
        problem = "missing API key"
    raise ClientError(
        401,
        f"{problem}: send the header 'Authorization: Bearer <key>' (EMBEDSERVE_API_KEY)",
        headers=dict(CHALLENGE),
    )


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()
