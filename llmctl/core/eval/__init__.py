"""``llmctl eval``: perplexity, multiple-choice and generative benchmarks with lm-evaluation-harness's
definitions (task YAML subset, request construction, window scheme, metrics and result keys).

- ``tasks``: task definitions (YAML, a documented subset of lm-eval's format) and the built-in tasks;
- ``scoring``: log-likelihoods from a causal LM (rolling windows, shared-context multiple choice);
- ``metrics``: metric and aggregation definitions (lm-eval's);
- ``runner``: documents → requests → scores → results.
"""
