"""llmctl finetune vs transformers' Trainer: LoRA SFT, same model, data, LoRA config, batch and steps.

Both run as fresh processes, one after the other, on the same prompt/completion JSONL (loss on the
completion only, in both): LoRA r=16, alpha=32, dropout 0.05 on every linear layer, AdamW lr 2e-4, cosine
schedule, clipping at 1.0, float32, one epoch. Reported: training tokens/s (real tokens, padding excluded,
over the training loop only), the final training loss, and each process's peak RSS. TRL's SFTTrainer is not
run: it is not installed in the project environment (see docs/benchmarks.md). Neither shuffles (llmctl
--no-shuffle, the Trainer with a sequential sampler), so every step holds the same examples in both and the
final losses are comparable. llmctl computes a batch padding-free (one row, attention per example); the
Trainer pads it to its longest example (dynamic padding, the usual collator).

    python benchmarks/finetune.py          # SmolLM2-135M-Instruct, 32 GSM8K records, batch 4, length 384
    python benchmarks/finetune.py --quick    # tiny model and synthetic data, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import bench_model

ROOT = Path(__file__).resolve().parent.parent
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"

# The obvious transformers + peft script for the same job.
PEER = r"""
import json, resource, sys, time
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

model_dir, data_path, out_dir = sys.argv[1:4]
batch_size, max_length = int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(model_dir)
pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
rows = []
for line in open(data_path, encoding="utf-8"):
    r = json.loads(line)
    p = tok(r["prompt"])["input_ids"]
    c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (p + c)[:max_length]
    rows.append({"input_ids": ids, "labels": ([-100] * len(p) + c)[:max_length]})

def collate(batch):
    width = max(len(b["input_ids"]) for b in batch)
    return {
        "input_ids": torch.tensor([b["input_ids"] + [pad] * (width - len(b["input_ids"])) for b in batch]),
        "labels": torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch]),
        "attention_mask": torch.tensor(
            [[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]
        ),
    }

model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
model = get_peft_model(model, lora)
args = TrainingArguments(
    output_dir=out_dir, per_device_train_batch_size=batch_size, num_train_epochs=1, learning_rate=2e-4,
    lr_scheduler_type="cosine", max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none",
    use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False, seed=0, disable_tqdm=True,
)
class InOrder(Trainer):  # the same batches as llmctl --no-shuffle
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)

trainer = InOrder(model=model, args=args, train_dataset=rows, data_collator=collate)
start = time.perf_counter()
result = trainer.train()
seconds = time.perf_counter() - start
tokens = sum(len(r["input_ids"]) for r in rows)
final_loss = trainer.state.log_history[-2].get("loss")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"train_seconds": seconds, "tokens": tokens, "final_loss": final_loss, "peak_rss_mb": peak}))
"""


def make_data(path: Path, quick: bool, records: int) -> None:
    with open(path, "w", encoding="utf-8") as out:
        if quick or not GSM8K.is_file():
            for i in range(32):
                prompt = f"Question {i}: what is {i} plus {i * 3}? " + "Think. " * (i % 4)
                out.write(json.dumps({"prompt": prompt, "completion": f" The answer is {i + i * 3}."}) + "\n")
            return
        for i, line in enumerate(GSM8K.open(encoding="utf-8")):
            if i >= records:
                break
            item = json.loads(line)
            out.write(json.dumps({"prompt": item["question"] + "\n", "completion": item["answer"]}) + "\n")


def run_llmctl(model: str, data: Path, out: Path, batch: int, max_length: int) -> dict:
    lora = [
        "--method",
        "lora",
        "--r",
        "16",
        "--alpha",
        "32",
        "--dropout",
        "0.05",
        "--target-modules",
        "all-linear",
    ]
    schedule = ["--lr", "2e-4", "--scheduler", "cosine", "--batch-size", str(batch), "--epochs", "1"]
    rest = [
        "--max-length",
        str(max_length),
        "--no-shuffle",
        "--device",
        "cpu",
        "--force",
        "--json",
        "--quiet",
    ]
    cmd = [
        sys.executable,
        "-m",
        "llmctl",
        "finetune",
        model,
        str(data),
        "-o",
        str(out),
        *lora,
        *schedule,
        *rest,
    ]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    summary = json.loads(done.stdout)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "train_seconds": summary["train_seconds"],
        "tokens": sum(r["tokens"] for r in rows),
        "final_loss": summary["final_loss"],
        "peak_rss_mb": rows[-1]["peak_memory_mb"],
    }


def run_peer(model: str, data: Path, out: Path, batch: int, max_length: int) -> dict:
    cmd = [sys.executable, "-c", PEER, model, str(data), str(out), str(batch), str(max_length)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, synthetic data")
    parser.add_argument("--model", help="model directory (default: SmolLM2, or llama-tiny with --quick)")
    parser.add_argument("--records", type=int, default=32, help="GSM8K training records (full run)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="llmctl-bench-") as tmp:
        tmp = Path(tmp)
        model = bench_model(args.model, args.quick, tmp)
        data = tmp / "train.jsonl"
        make_data(data, args.quick, args.records)
        repeats = 1 if args.quick else args.repeats
        ours = [
            run_llmctl(model, data, tmp / "ours", args.batch_size, args.max_length) for _ in range(repeats)
        ]
        peer = [run_peer(model, data, tmp / "peer", args.batch_size, args.max_length) for _ in range(repeats)]

    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    print(f"model: {model}; batch {args.batch_size}; LoRA r=16 all-linear; median of {repeats} run(s)")
    print(f"{'tool':<28}{'train s':>10}{'tokens/s':>11}{'final loss':>12}{'peak RSS MB':>13}")
    for name, runs in (("llmctl finetune", ours), ("transformers Trainer", peer)):
        tps = med(runs, "tokens") / med(runs, "train_seconds")
        print(
            f"{name:<28}{med(runs, 'train_seconds'):>10.2f}{tps:>11.1f}{med(runs, 'final_loss'):>12.4f}"
            f"{med(runs, 'peak_rss_mb'):>13.0f}"
        )
    ratio = (med(ours, "tokens") / med(ours, "train_seconds")) / (
        med(peer, "tokens") / med(peer, "train_seconds")
    )
    mem = med(ours, "peak_rss_mb") / med(peer, "peak_rss_mb")
    print(f"tokens/s ratio (llmctl / Trainer): {ratio:.2f}x; peak RSS ratio: {mem:.2f}x")


if __name__ == "__main__":
    main()
