"""The applications: the ``ldm`` CLI, the HTTP server and web UI, the benchmark.

They sit on top of the engine and import downwards only (tests/test_layers.py checks it):

    ldm_engine.apps          CLI, server, web UI, bench
    pipelines, train         the modes on the one loop; training and evaluation
    schedulers               samplers and schedules
    ldm_engine (the rest)    models, formats, conversion, tokenizer, limits

Nothing below imports this package. The package's one import-time side effect (torch's
allocator option) is in ldm_engine/__init__.py, which every layer reaches through its own
imports of the core.
"""
