"""ldm-engine core: configs, components, tokenizer, formats, conversion (the applications
that sit on top of the engine are in ldm_engine.apps).

The engine's import-time side effects are here and nowhere else (tests/test_layers.py checks it):
importing the core, which every layer does through its own imports of it, sets two environment
variables, each only where the user has not set it already.

HF_HUB_OFFLINE=1: a model is always a local folder or file, so no library below us may try a hub
for a missing file (huggingface_hub reads it once, when it is imported).

THP_MEM_ALLOC_ENABLE=1 asks torch's CPU allocator for transparent huge pages on large buffers.
On kernels that give huge pages only where asked (THP "madvise", the common default) activations
and workspaces otherwise sit on 4 KiB pages, and the TLB misses cost the SD-1.5 UNet about a fifth
of its fp32 speed (2.02 s vs 1.61 s a step here). torch reads the variable once, at its first
CPU allocation (importing torch makes none: tests/test_layers.py checks that the huge pages are
got through every layer's import), so this must run before any tensor is made.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
