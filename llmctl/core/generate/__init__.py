"""llmctl's own decoding engine: a plain-torch decoder with a preallocated KV cache, samplers, a loop.

- ``model``: the Llama-family decoder (llama, mistral, qwen2) with module names that match Hugging Face
  checkpoints, so weights load straight from safetensors;
- ``sampling``: logits processors and samplers (HF's order), per-request seeded generators;
- ``engine``: prefill + decode over a batch of left-padded prompts, stop strings, EOS, max tokens.
"""
