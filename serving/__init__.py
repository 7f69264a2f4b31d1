"""The search page and service: a FastAPI app over one :class:`retrieval.searcher.Searcher`.

- :mod:`serving.app`: ``create_app(searcher)``, the page (``/``, ``/static/...``) and the API
  (``/api/...``, ``/healthz``, ``/metrics``); serve.py runs it with uvicorn.
- :mod:`serving.decoding`: bounded work per upload (a few decodes at once, a pixel limit from
  the model's input).
- :mod:`serving.guards`: middleware that refuses early (body size and time, the API key) and
  answers OPTIONS.
- :mod:`serving.live`: the gallery swapped for its rewritten file without a restart.
- :mod:`serving.operations`: the JSON access log, Prometheus metrics, uvicorn's settings.
- :mod:`serving.errors`: the one-line JSON refusal.
- ``serving/static/``: the page, plain HTML, CSS and JavaScript (no build step, nothing fetched
  from elsewhere).
"""
