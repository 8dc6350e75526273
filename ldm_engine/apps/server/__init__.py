"""`ldm serve`: the HTTP server (FastAPI + uvicorn), its SQLite job queue, the AUTOMATIC1111
compatible API, the Gradio web UI and the Ray Serve deployment.

    config.py    ServerConfig, Limits, API-key hashing
    jobs.py      JobStore: jobs and results in SQLite, claimed under leases
    worker.py    Worker: one per device, dynamic batching onto Pipeline.run
    service.py   JobService: what every front end calls (submit, get, cancel, events)
    app.py       create_app: the native /v1 API, /healthz, /metrics, security, limits
    a1111.py     /sdapi/v1/*: AUTOMATIC1111's API over the same jobs
    a1111_fields.py  A1111 bodies -> our requests; A1111's answers (info, progress, png-info)
    webui.py     the Gradio UI mounted at /: its layout and wiring
    webui_handlers.py  the UI's handlers (generate, cancel, PNG info), browser-free
    ray_app.py   the same app as a Ray Serve deployment
"""
