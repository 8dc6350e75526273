"""ldm-engine core: configs, components, tokenizer, formats, conversion, CLI.

Importing it (which every package of the engine does first) asks torch's CPU allocator for
transparent huge pages on large buffers, unless the user has set THP_MEM_ALLOC_ENABLE already.
On kernels that give huge pages only where asked (THP "madvise", the common default) activations
and workspaces otherwise sit on 4 KiB pages, and the TLB misses cost the SD-1.5 UNet about a fifth
of its fp32 speed (2.02 s vs 1.61 s a step here). torch reads the variable once, at its first
allocation, so this must run before torch is imported; after that it changes nothing.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
