"""Training data for a copy-specialised draft model: chat prompts that ask for a passage back verbatim.

The speculative-decoding rows of `benchmarks/generate.py --workload copy` need a draft that copies the way
the target does. This writes prompt/completion JSONL for `llmctl finetune` from the real text in
../shared/data (GSM8K questions and worked answers, Tiny Shakespeare paragraphs, Self-Instruct instances,
HH-RLHF human turns; WikiText is left out for its `<unk>` tokens): each prompt is one of a few "repeat this
exactly" instructions plus a 25-110-word passage, rendered with the model's chat template; the completion
is the passage and the end-of-turn token. The benchmark's own passage is never used.

    python scripts/copy_draft_data.py MODEL -o copy.jsonl --count 2400
    python scripts/copy_draft_data.py MODEL -o copy2.jsonl --count 3000 --skip 2400   # fresh passages
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
ASKS = (
    "Repeat the following text exactly, word for word.",
    "Copy this passage exactly.",
    "Please repeat the text below verbatim.",
    "Reproduce the following text exactly as written.",
    "Repeat this exactly:",
    "Write out the following text again, unchanged.",
)


def passages(data: Path) -> list[str]:
    out: list[str] = []
    for line in (data / "gsm8k" / "train.jsonl").open():
        r = json.loads(line)
        out.append(r["question"])
        out.append(re.sub(r"<<[^>]*>>", "", r["answer"]).split("####")[0].strip())
    out += [t.strip() for t in (data / "tinyshakespeare" / "input.txt").read_text().split("\n\n")]
    for line in (data / "self-instruct" / "seed_tasks.jsonl").open():
        for inst in json.loads(line)["instances"]:
            out += [inst["output"], inst["input"]]
    with gzip.open(data / "hh-rlhf-harmless-base" / "test.jsonl.gz", "rt") as f:
        for line in f:
            for turn in json.loads(line)["chosen"].split("\n\nHuman:")[1:]:
                out.append(turn.split("\n\nAssistant:")[0].strip())
    return [p for p in out if 25 <= len(p.split()) <= 110 and "<unk>" not in p and "lighthouse" not in p]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="the target model (its chat template and end-of-turn token)")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--count", type=int, default=2400)
    parser.add_argument("--skip", type=int, default=0, help="start after this many (shuffled) passages")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--data", default=str(DATA))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    end = tok.eos_token or ""
    pool = passages(Path(args.data))
    rng = random.Random(args.seed)
    rng.shuffle(pool)
    chosen = pool[args.skip : args.skip + args.count]
    with open(args.output, "w") as f:
        for text in chosen:
            messages = [{"role": "user", "content": f"{rng.choice(ASKS)}\n\n{text}"}]
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            f.write(json.dumps({"prompt": prompt, "completion": text + end}) + "\n")
    print(f"{len(chosen)} of {len(pool)} passages -> {args.output}")


if __name__ == "__main__":
    main()
