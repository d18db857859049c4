"""How tokens become logits: configs, layers, paged attention, architectures, loaders,
tokenizer and sampler. Pure torch + tokenizers; no scheduling, no HTTP."""
