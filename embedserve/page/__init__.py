"""The search page: a plain HTML/JS/CSS page served at `/`, and the OpenAPI page at `/docs`.

    page     install_page(app): the routes of the page, its assets (/page/...) and /docs
    static/  index.html, app.js and api.js (JS modules), style.css, docs.html

The page holds no data, so it and its assets are open even when an API key is set; the page
asks for the key when the server answers 401 and sends it with its calls. Nothing comes from
another site: it works offline.
"""

from embedserve.page.page import install_page

__all__ = ["install_page"]
