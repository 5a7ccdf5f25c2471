"""The admin API on real proxy processes: keys and users over HTTP, guarded by the admin key;
and two processes sharing PostgreSQL, where a key revoked through one is refused by both
within a second."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from robota_proxy.testing import FakeVendors
from tests.e2e.auth_support import (
    ADMIN_KEY,
    REVOKE_BOUND,
    admin,
    chat,
    chat_body,
    seconds_until_refused,
)
from tests.e2e.conftest import ProxyProcess, start_proxy, stop_proxy, vendor_env

pytestmark = pytest.mark.e2e


def _env(fake: FakeVendors, database_url: str, **extra: str) -> dict[str, str]:
    return {
        **vendor_env(fake),
        "ROBOTA_DATABASE_URL": database_url,
        "ROBOTA_ADMIN_KEY": ADMIN_KEY,
        "ROBOTA_AUTH_FAILURES_PER_MINUTE": "1000",
        **extra,
    }


@pytest.fixture(scope="module")
def pg_proxies(
    fake_server: FakeVendors, postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    folder = tmp_path_factory.mktemp("pg")
    env = _env(fake_server, postgres_url)
    # Started side by side: both also race to apply the migrations, as workers do.
    with ThreadPoolExecutor(2) as pool:
        starting = [pool.submit(start_proxy, env, folder / name) for name in ("a.log", "b.log")]
    errors = [f.exception() for f in starting if f.exception() is not None]
    started = [f.result() for f in starting if f.exception() is None]
    if errors:
        for proxy in started:
            stop_proxy(proxy)
        raise errors[0]
    first, second = started
    yield first, second
    stop_proxy(second)
    stop_proxy(first)


def test_key_lifecycle_over_http(pg_proxies: tuple[ProxyProcess, ProxyProcess]) -> None:
    url = pg_proxies[0].url
    made = admin(
        "POST",
        url,
        "/admin/keys",
        json={
            "user": "frank",
            "name": "ci",
            "expiresIn": "30d",
            "permissions": {"allowedProviders": ["mock"], "rpm": 100},
        },
    )
    assert made.status_code == 201, made.text
    assert made.headers["cache-control"] == "no-store"
    created = made.json()
    key = created["key"]
    assert key.startswith(f"rk_{created['id']}_")
    assert created["permissions"] == {"allowedProviders": ["mock"], "rpm": 100}
    assert created["status"] == "active" and created["expiresAt"] is not None

    listed = admin("GET", url, "/admin/keys", params={"user": "frank"})
    assert [k["id"] for k in listed.json()["keys"]] == [created["id"]]
    shown = admin("GET", url, f"/admin/keys/{created['id']}")
    assert shown.status_code == 200 and shown.json()["name"] == "ci"
    for response in (listed, shown):
        assert key not in response.text

    put = admin("PUT", url, "/admin/users/frank", json={"permissions": {"tpm": 500}})
    assert put.status_code == 200 and put.json()["permissions"] == {"tpm": 500}
    user = admin("GET", url, "/admin/users/frank").json()
    assert user["permissions"] == {"tpm": 500}
    assert [k["id"] for k in user["keys"]] == [created["id"]]
    assert key not in str(user)

    assert admin("GET", url, "/admin/keys/nosuchid").status_code == 404
    assert admin("DELETE", url, "/admin/keys/nosuchid").status_code == 404
    assert admin("GET", url, "/admin/users/nobody").status_code == 404


def test_bad_admin_input_is_a_clear_400(pg_proxies: tuple[ProxyProcess, ProxyProcess]) -> None:
    url = pg_proxies[0].url
    for body, words in [
        ({}, "user"),
        ({"user": ""}, "user"),
        ({"user": "x", "permissions": {"allowedFeatures": ["video"]}}, "video"),
        ({"user": "x", "permissions": {"rpmm": 1}}, "rpmm"),
        ({"user": "x", "expiresIn": "soon"}, "soon"),
        ({"user": "x", "expiresAt": "2001-01-01"}, "past"),
        ({"user": "x", "expiresIn": "1d", "expiresAt": "2099-01-01"}, "not both"),
        ({"user": "x", "role": "root"}, "role"),
    ]:
        response = admin("POST", url, "/admin/keys", json=body)
        assert response.status_code == 400, (body, response.text)
        assert words in response.json()["error"]["message"]
    broken = admin("POST", url, "/admin/keys", content=b"{not json")
    assert broken.status_code == 400


def test_admin_routes_need_the_admin_key(pg_proxies: tuple[ProxyProcess, ProxyProcess]) -> None:
    url = pg_proxies[0].url
    user_key = admin("POST", url, "/admin/keys", json={"user": "gina"}).json()["key"]
    for headers in ({}, {"Authorization": f"Bearer {user_key}"}, {"Authorization": "Bearer x"}):
        response = httpx.get(f"{url}/admin/keys", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthenticated"
    # And the admin key is not a user key.
    assert chat(url, ADMIN_KEY).status_code == 401


def test_revoked_on_one_process_is_refused_by_both(
    pg_proxies: tuple[ProxyProcess, ProxyProcess], fake: FakeVendors
) -> None:
    first, second = pg_proxies
    created = admin("POST", first.url, "/admin/keys", json={"user": "henry"}).json()
    key = created["key"]
    for proxy in (first, second):  # both processes have now cached the key as valid
        assert chat(proxy.url, key).status_code == 200
        assert chat(proxy.url, key, chat_body("openai", "gpt-4o-mini")).status_code == 200
    revoked = admin("DELETE", first.url, f"/admin/keys/{created['id']}")
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert seconds_until_refused([first.url, second.url], key) < REVOKE_BOUND
    assert key not in first.log() + second.log()
    assert ADMIN_KEY not in first.log() + second.log()
