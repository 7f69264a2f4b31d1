"""The search page and service: a FastAPI app over one :class:`retrieval.searcher.Searcher`.

- :mod:`serving.app`: ``create_app(searcher)``, the page (``/``, ``/static/...``) and the API
  (``/api/...``, ``/healthz``); serve.py runs it with uvicorn.
- ``serving/static/``: the page, plain HTML, CSS and JavaScript (no build step, nothing fetched
  from elsewhere).
"""
