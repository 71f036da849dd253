"""The search page's routes (embedserve.page), in-process: `/`, its assets and `/docs` are open
with a key set, revalidated by ETag, nothing else is served from the folder, and the files ship
as package data (pyproject.toml) and in the Bento (bentofile.yaml)."""

from __future__ import annotations

import fnmatch
import re
import tomllib

import pytest
import yaml

from embedserve.page import page
from tests.embedserve.http_app import KEY, Client, tiny_app
from tests.embedserve.server import REPO

PAGES = {"/": "text/html", "/docs": "text/html"} | {
    f"/page/{name}": media.split(";")[0] for name, media in page.ASSETS.items()
}


@pytest.fixture(scope="module")
def client() -> Client:
    return Client(tiny_app(api_key=KEY))


@pytest.mark.parametrize("path", sorted(PAGES))
def test_the_page_its_assets_and_docs_are_open_with_a_key_set(client, path):
    response = client.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].split(";")[0] == PAGES[path]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert client.get("/auth").status_code == 401  # the key is set


def test_the_html_holds_the_file_input_and_a_strict_content_security_policy(client):
    response = client.get("/")
    assert '<input type="file"' in response.text
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "connect-src 'self'" in csp and "http" not in csp


def test_every_file_the_page_references_is_served(client):
    html = client.get("/").text
    refs = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert "page/app.js" in refs and "page/style.css" in refs
    for ref in refs:
        assert client.get("/" + ref.removeprefix("./")).status_code == 200, ref
    imports = re.findall(r'from "\./([^"]+)"', client.get("/page/app.js").text)
    assert imports == ["api.js"]
    for name in imports:
        assert client.get(f"/page/{name}").status_code == 200


def test_docs_is_bentoml_swagger_ui_on_its_own_assets(client):
    html = client.get("/docs").text
    assert 'id="swagger-ui"' in html
    assert "static_content/swagger-ui-bundle.js" in html  # BentoML serves /static_content
    assert "googletagmanager" not in html and "https://" not in html


def test_an_unchanged_file_is_answered_304(client):
    first = client.get("/page/app.js")
    assert first.headers["cache-control"] == "no-cache"
    again = client.get("/page/app.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert client.get("/page/app.js", headers={"If-None-Match": '"other"'}).status_code == 200


@pytest.mark.parametrize(
    "path",
    ["/page/", "/page/index.html", "/page/docs.html", "/page/missing.js", "/page/../page.py"]
    + ["/page/%2e%2e/page.py", "/index.html", "/static/app.js", "/redoc", "/openapi.json"],
)
def test_nothing_else_is_served(client, path):
    assert client.get(path).status_code == 404


def test_head_answers_like_get(client):
    response = client.request("HEAD", "/")
    assert response.status_code == 200 and response.content == b""


def test_the_page_routes_are_not_in_the_openapi_spec():
    app = tiny_app()
    documented = {
        getattr(r, "path", None) for r in app.routes if getattr(r, "include_in_schema", 0)
    }
    assert not documented & set(PAGES)


def test_the_files_ship_as_package_data_and_in_the_bento():
    files = sorted(p.relative_to(REPO / "embedserve") for p in page.STATIC.iterdir())
    assert {f.name for f in files} == {"index.html", "docs.html", *page.ASSETS}
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["embedserve"]
    include = yaml.safe_load((REPO / "bentofile.yaml").read_text())["include"]
    for f in files:
        assert any(fnmatch.fnmatch(str(f), glob) for glob in package_data), f
        assert any(fnmatch.fnmatch(f"embedserve/{f}", glob) for glob in include), f
