"""How tokens become logits: configs, layers, paged attention, architectures, loaders,
tokenizer and sampler. Pure torch + tokenizers; no scheduling, no HTTP."""
import os

# torch's CPU allocator puts allocations of 2 MiB and more on transparent huge pages when this is
# set (read once, at torch's first allocation: so before `import torch`; a value already in the
# environment wins). Decode streams every weight once a step: on 4 KiB pages the hardware
# prefetchers stop at each page and the TLB misses, and one decode step of the 1B-shaped Q4_0
# file ran 22-26 ms against 20-24 ms with huge pages (`workmem bench step`, batch 1, same sitting);
# a Q8_0 8192 x 2048 matmul 0.41-0.54 against 0.35-0.46 ms. The kernel's THP mode must be
# `madvise` or `always` (/sys/kernel/mm/transparent_hugepage/enabled); elsewhere this is a no-op.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
