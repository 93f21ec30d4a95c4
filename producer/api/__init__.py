"""`sdfarm serve`: the farm's HTTP front door, one ASGI app on the producer's contract (producer/farm.py).

- app.py      the app: auth, limits, errors as JSON, /healthz and /readyz, the routers below
- auth.py     bearer tokens (constant-time), gallery sessions, per-token concurrency
- native.py   the native API under /v1 (OpenAPI docs at /docs)
- a1111.py    A1111's /sdapi/v1 (txt2img, img2img and the lists), for the tools that speak it
- gallery.py  the gallery pages at /

The service holds no GPU and no model: it enqueues on the farm and reads Redis and S3.
"""
