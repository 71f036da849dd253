"""The API key check (embedserve.http.auth), in-process: missing, wrong and right keys, the
open mode without a key, and the constant-time comparison of equal-length digests."""

from __future__ import annotations

import hmac

import pytest

from embedserve.http import auth
from tests.embedserve.http_app import KEY, Client, tiny_app

CHALLENGE = 'Bearer realm="embedserve"'


@pytest.fixture(scope="module")
def client() -> Client:
    return Client(tiny_app())


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({}, "missing API key"),
        ({"Authorization": KEY}, "missing API key"),  # no scheme
        ({"Authorization": f"Basic {KEY}"}, "missing API key"),  # another scheme
        ({"Authorization": "Bearer"}, "wrong API key"),
        ({"Authorization": "Bearer "}, "wrong API key"),
        ({"Authorization": f"Bearer {KEY[:-1]}"}, "wrong API key"),  # a prefix
        ({"Authorization": f"Bearer {KEY}x"}, "wrong API key"),  # longer
        ({"Authorization": f"Bearer {KEY.upper()}"}, "wrong API key"),  # case matters
    ],
    ids=["none", "no-scheme", "basic", "empty", "blank", "prefix", "longer", "upper"],
)
def test_a_missing_or_wrong_key_gets_401_with_a_challenge(client, headers, problem):
    response = client.get("/auth", headers=headers)
    assert response.status_code == 401
    assert response.json() == {
        "error": f"{problem}: send the header 'Authorization: Bearer <key>' (EMBEDSERVE_API_KEY)"
    }
    assert response.headers["www-authenticate"] == CHALLENGE


def test_the_error_never_repeats_what_was_sent(client):
    sent = "Bearer attacker-controlled-<script>-value"
    response = client.get("/auth", headers={"Authorization": sent})
    assert response.status_code == 401
    assert "attacker" not in response.text and KEY not in response.text


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_right_key_passes_whatever_the_schemes_case(client, scheme):
    response = client.get("/auth", headers={"Authorization": f"{scheme} {KEY}"})
    assert response.status_code == 200, response.text
    # surrounding whitespace of the token is not part of the key
    assert client.get("/auth", headers={"Authorization": f"Bearer  {KEY} "}).status_code == 200


def test_without_a_key_the_reading_endpoints_are_open(client):
    assert client.get("/open").status_code == 200
    assert client.get("/open", headers={"Authorization": "Bearer whatever"}).status_code == 200


def test_without_a_key_a_required_check_always_fails(client):
    response = client.get("/required", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 401
    assert response.json()["error"].startswith("missing API key")
    assert client.get("/required", params={"key": KEY}).status_code == 401  # no header
    response = client.get(
        "/required", params={"key": KEY}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 200


def test_the_comparison_is_constant_time_over_equal_length_digests(client, monkeypatch):
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    for token in ("x", "y" * 500, KEY):
        client.get("/auth", headers={"Authorization": f"Bearer {token}"})
    assert len(compared) == 3  # every check goes through hmac.compare_digest
    # the same length whatever was sent: neither the key's length nor the token's shows
    assert {len(a) for a, _ in compared} == {len(b) for _, b in compared} == {32}
    assert compared[0][1] == compared[1][1] == compared[2][1]
    assert compared[2][0] == compared[2][1]
