"""``llmctl serve``: an OpenAI-compatible server on a continuous-batching engine with a paged KV cache.

- ``blocks``: the block allocator (free list, reference counts) and automatic prefix caching (chained
  block hashes, LRU eviction of unreferenced cached blocks);
- ``scheduler``: continuous batching under a token budget, chunked prefill, preemption by recompute;
- ``runner``: one model step over the paged cache (``llmctl.kernels.paged_attention`` for decodes);
- ``engine``: requests in, tokens out (the generate engine's samplers), and its background-thread driver;
- ``api``, ``metrics``, ``server``: FastAPI routes, Prometheus metrics, uvicorn.
"""
