"""Serving: the stream engine behind an HTTP endpoint, on Ray Serve.

OpenAI's speech interface (``protocol``: request fields, errors, PCM and WAV bytes), one
engine with its voices and Prometheus metrics (``service``), the FastAPI routes over it
(``api``) and the Ray Serve deployment that places replicas on a local Ray or a cluster
(``deployment``). May import ``core``, ``models``, ``instruments`` and ``runtime``; ``studies``
and ``serving`` do not import each other (the HTTP load client lives in ``studies``).
"""
