"""The dashboard's files under ``/static``: each answers only at its own name, through the
route that fills its placeholders, never as the raw template on disk."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from xasflow.daemon.counters import Counters
from xasflow.daemon.dashboard_routes import STATIC_DIR, install_dashboard


class _Quiet:
    """The members of a DaemonView the dashboard's routes read."""

    counters = Counters()


@pytest.fixture
def client() -> Iterator[TestClient]:
    """The dashboard's routes alone, on an app of their own."""
    app = Starlette()
    dash = install_dashboard(app, _Quiet())  # type: ignore[arg-type]
    try:
        yield TestClient(app)
    finally:
        dash.stop()


@pytest.mark.parametrize(
    "path",
    [
        "/static/..%2Fstatic%2Fapp.js",  # resolves inside the folder
        "/static/%2E%2E%2Fstatic%2Fapp.js",
        "/static/.%2Fapp.js",
        "/static/index.html",  # the page's template (and without the page's headers)
        "/static/..%2Fstatic%2Fstyle.css",
    ],
)
def test_a_file_is_not_served_raw_under_another_name(client: TestClient, path: str) -> None:
    """Before: a script's name spelled as a path (``..%2Fstatic%2Fapp.js``) missed the
    script route and reached the static folder, which served the template with its
    ``{{query}}`` unfilled (its imports then lost the access token), and ``index.html`` came
    without the page's security headers. Now such a path is refused."""
    assert "{{query}}" in (STATIC_DIR / "app.js").read_text(encoding="utf-8")
    response = client.get(f"{path}?token=abc")
    assert response.status_code == 404, response.text[:200]


def test_each_file_answers_at_its_own_name(client: TestClient) -> None:
    """The scripts (their imports carrying the token) and the style sheet still answer."""
    scripts = sorted(p.name for p in STATIC_DIR.glob("*.js"))
    assert "app.js" in scripts
    for name in scripts:
        response = client.get(f"/static/{name}?token=abc")
        assert response.status_code == 200, name
        assert "{{" not in response.text, name
    assert '.js?token=abc"' in client.get("/static/app.js?token=abc").text
    response = client.get("/static/style.css")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/css")
    assert response.text == (STATIC_DIR / "style.css").read_text(encoding="utf-8")
