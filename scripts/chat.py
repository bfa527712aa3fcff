"""One greedy chat answer through transformers, from a local model directory (used by `make demo`).

python scripts/chat.py MODEL_DIR "What is the capital of France?"
"""

import sys

import llmctl.core  # noqa: F401 - offline, quiet third-party libraries
from llmctl.core.models.hf import load_model, load_tokenizer, resolve_model


def answer(model_dir: str, question: str, max_new_tokens: int = 40) -> str:
    ref = resolve_model(model_dir)
    model, tokenizer = load_model(ref, device="cpu"), load_tokenizer(ref)
    messages = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(answer(sys.argv[1], sys.argv[2]))
