"""Serving under load: llmctl serve vs llama.cpp's server (llama-cpp-python[server]), same GGUF, same run.

An async load generator in the style of ``vllm bench serve``: N requests, at most C in flight, each a
streamed /v1/completions with greedy decoding and a fixed ``max_tokens``. Per request it records the time
to first token (TTFT), the gaps between chunks (ITL) and TPOT = (end-to-end - TTFT) / (output tokens - 1);
per run the request and token throughputs and p50/p99 of the latencies. Output tokens are counted by
tokenizing the returned text with the model's tokenizer, the same way for both servers.

Scenarios: concurrency 1 and 32 (total token throughput ratio), then a shared ~1k-token system prompt
with and without prefix caching (median TTFT ratio; the system prompt is sent once, untimed, before the
timed requests, as on a server that has seen it before), then llama.cpp's server at the same concurrency.

    python benchmarks/serve.py            # SmolLM2-135M-Instruct Q4_1 GGUF (make smollm2), both servers
    python benchmarks/serve.py --quick    # llama-tiny, in-process llmctl server only, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from _common import bench_model

import llmctl.core  # noqa: F401 - offline, quiet

GGUF = Path(os.environ.get("LLMCTL_CACHE", Path.home() / ".cache" / "llmctl")) / "downloads"
GGUF = GGUF / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = [
    "a lighthouse",
    "the moon",
    "a robot",
    "a river",
    "a small town",
    "the ocean",
    "a library",
    "winter",
]


@dataclass
class Result:
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def one_request(client, model: str, prompt: str, max_tokens: int) -> Result:
    r = Result()
    start = time.perf_counter()
    last = start
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        async for chunk in stream:
            text = chunk.choices[0].text if chunk.choices else ""
            if not text:
                continue
            now = time.perf_counter()
            if not r.text:
                r.ttft = now - start
            else:
                r.itl.append(now - last)
            last = now
            r.text += text
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        r.error = f"{type(e).__name__}: {e}"
    r.e2e = time.perf_counter() - start
    return r


async def run_load(base_url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int):
    import openai

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def bounded(p):
        async with gate:
            return await one_request(client, model, p, max_tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*(bounded(p) for p in prompts))
    wall = time.perf_counter() - start
    await client.close()
    return results, wall


def summarize(name: str, results: list[Result], wall: float, tokenizer, prompts: list[str]) -> dict:
    print(f"  {name}: {len(results)} requests in {wall:.1f}s", file=sys.stderr, flush=True)
    ok = [r for r in results if not r.error]
    for r, p in zip(results, prompts, strict=True):
        r.prompt_tokens = len(tokenizer(p)["input_ids"])
        r.output_tokens = len(tokenizer(r.text, add_special_tokens=False)["input_ids"]) if r.text else 0
    out_tokens = sum(r.output_tokens for r in ok)
    total_tokens = out_tokens + sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    row = {
        "name": name,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "wall_s": wall,
        "req_per_s": len(ok) / wall,
        "out_tok_per_s": out_tokens / wall,
        "total_tok_per_s": total_tokens / wall,
        "ttft_p50_ms": 1000 * pct([r.ttft for r in ok], 50),
        "ttft_p99_ms": 1000 * pct([r.ttft for r in ok], 99),
        "tpot_p50_ms": 1000 * pct(tpot, 50),
        "itl_p50_ms": 1000 * pct(itl, 50),
        "itl_p99_ms": 1000 * pct(itl, 99),
        "first_error": next((r.error for r in results if r.error), ""),
    }
    print(f"    {json.dumps(row)}", file=sys.stderr, flush=True)
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"server at {url} did not start in {timeout:.0f}s")


class LlmctlServer:
    """``llmctl serve`` as a subprocess (full runs) or on a thread of this process (--quick)."""

    def __init__(
        self,
        model: str,
        *,
        in_process: bool,
        prefix_caching: bool = True,
        max_num_seqs: int = 64,
        draft: str | None = None,
        num_draft_tokens: int = 4,
        prompt_lookup: int = 0,
    ):
        self.model, self.in_process = model, in_process
        self.prefix_caching, self.max_num_seqs = prefix_caching, max_num_seqs
        self.draft, self.num_draft_tokens, self.prompt_lookup = draft, num_draft_tokens, prompt_lookup

    def __enter__(self) -> str:
        if self.in_process:
            from llmctl.core.generate.run import load_engine
            from llmctl.core.serve.engine import ServeConfig
            from llmctl.core.serve.server import create_server, start_in_thread

            config = ServeConfig(
                prefix_caching=self.prefix_caching,
                max_num_seqs=self.max_num_seqs,
                num_draft_tokens=self.num_draft_tokens,
                prompt_lookup=self.prompt_lookup,
            )
            engine = load_engine(self.model)
            draft = load_engine(self.draft) if self.draft else None
            self.server = start_in_thread(create_server(engine, config, port=0, model_name="m", draft=draft))
            return self.server.url
        cmd = [sys.executable, "-m", "llmctl", "serve", self.model, "--port", "0", "--served-model-name", "m",
               "--max-num-seqs", str(self.max_num_seqs)]  # fmt: skip
        if not self.prefix_caching:
            cmd.append("--no-prefix-caching")
        if self.draft:
            cmd += ["--draft", self.draft, "--num-draft-tokens", str(self.num_draft_tokens)]
        if self.prompt_lookup:
            cmd += ["--prompt-lookup", str(self.prompt_lookup)]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        port = None
        while port is None:
            line = self.proc.stderr.readline().decode()
            if not line:
                raise SystemExit(f"llmctl serve did not start: {self.proc.stderr.read().decode()[-2000:]}")
            if m := re.search(r"listening on port (\d+)", line):
                port = int(m[1])
        # keep draining stderr, or a chatty server would block on a full pipe
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, self.proc)
        return url

    def __exit__(self, *exc) -> None:
        if self.in_process:
            self.server.stop()
        else:
            self.proc.terminate()
            self.proc.wait(timeout=60)


class LlamaCppServer:
    def __init__(self, gguf: Path, n_ctx: int) -> None:
        self.gguf, self.n_ctx = gguf, n_ctx

    def __enter__(self) -> str:
        port = free_port()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--model_alias", "m",
               "--port", str(port), "--n_ctx", str(self.n_ctx), "--interrupt_requests", "False",
               "--n_threads", str(os.cpu_count()), "--n_threads_batch", str(os.cpu_count())]  # fmt: skip
        self.log = tempfile.TemporaryFile()  # llama.cpp logs a lot: a pipe nobody reads would block it
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, None)
        return url

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def llama_cpp_available() -> bool:
    try:
        import llama_cpp.server.app  # noqa: F401
    except Exception:  # noqa: BLE001 - missing extra, or a broken install: skip the peer
        return False
    return True


def prompts_for(n: int, system: str = "") -> list[str]:
    return [f"{system}Write a short story about {TOPICS[i % len(TOPICS)]} (story {i}):" for i in range(n)]


def print_table(rows: list[dict]) -> None:
    cols = [("name", "run", 34, "s"), ("requests", "reqs", 6, "d"), ("failed", "fail", 5, "d"),
            ("req_per_s", "req/s", 8, ".2f"), ("out_tok_per_s", "out tok/s", 10, ".1f"),
            ("total_tok_per_s", "total tok/s", 12, ".1f"), ("ttft_p50_ms", "TTFT p50", 10, ".0f"),
            ("ttft_p99_ms", "TTFT p99", 10, ".0f"), ("tpot_p50_ms", "TPOT p50", 10, ".1f"),
            ("itl_p50_ms", "ITL p50", 9, ".1f"), ("itl_p99_ms", "ITL p99", 9, ".1f")]  # fmt: skip
    print("".join(f"{h:<{w}}" if f == "s" else f"{h:>{w}}" for _, h, w, f in cols))
    for row in rows:
        print("".join(f"{row[k]:<{w}{f}}" if f == "s" else f"{row[k]:>{w}{f}}" for k, _, w, f in cols))
    for row in rows:
        if row["first_error"]:
            print(f"  {row['name']}: first error: {row['first_error'][:200]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, in-process server, no peer")
    parser.add_argument("--model", help="model directory or .gguf (default: the SmolLM2 Q4_1 GGUF)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, help="requests of the concurrent run (default: concurrency)")
    parser.add_argument("--requests-c1", type=int, default=4, help="requests of the concurrency-1 run")
    parser.add_argument("--prefix-requests", type=int, default=8, help="requests of each shared-prefix run")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--system-tokens", type=int, default=1000, help="shared system prompt length (approx.)"
    )
    parser.add_argument("--no-peer", action="store_true", help="skip llama.cpp's server")
    parser.add_argument(
        "--draft", help="also run concurrency 1 with this draft model (speculative decoding; same tokenizer)"
    )
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument(
        "--prompt-lookup",
        type=int,
        default=0,
        help="also run concurrency 1 with prompt-lookup speculation (K)",
    )
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON lines")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tmp = tempfile.TemporaryDirectory(prefix="llmctl-bench-")
    if args.quick:
        model = bench_model(args.model, True, Path(tmp.name))
        conc, n_conc, n_one, max_tokens, system_words, n_prefix = 4, 8, 2, 8, 60, 4
    else:
        model = args.model or (str(GGUF) if GGUF.is_file() else bench_model(None, False, Path(tmp.name)))
        conc, max_tokens = args.concurrency, args.max_tokens
        n_conc, n_one = args.requests or conc, args.requests_c1
        system_words, n_prefix = args.system_tokens, args.prefix_requests
    from llmctl.core.models.hf import load_tokenizer, resolve_model

    tokenizer = (
        load_tokenizer(resolve_model(model))
        if model.endswith(".gguf")
        else AutoTokenizer.from_pretrained(model)
    )
    system = "You are a helpful, careful assistant. " * max(1, system_words // 8) + "\n"
    rows: list[dict] = []
    in_process = args.quick
    c1_prompts, cn_prompts = prompts_for(n_one), prompts_for(n_conc)
    prefix_prompts = prompts_for(n_prefix, system)
    prefix_conc = min(4, conc)
    with LlmctlServer(model, in_process=in_process) as url:
        asyncio.run(run_load(url, "m", prompts_for(2), 2, 2))  # warm-up
        for name, prompts, c in (("llmctl c=1", c1_prompts, 1), (f"llmctl c={conc}", cn_prompts, conc)):
            results, wall = asyncio.run(run_load(url, "m", prompts, max_tokens, c))
            rows.append(summarize(name, results, wall, tokenizer, prompts))
        asyncio.run(run_load(url, "m", prompts_for(1, system), 1, 1))  # the system prompt seen once before
        results, wall = asyncio.run(run_load(url, "m", prefix_prompts, max_tokens, prefix_conc))
        rows.append(
            summarize(
                f"llmctl shared prefix, cache on c={prefix_conc}", results, wall, tokenizer, prefix_prompts
            )
        )
    with LlmctlServer(model, in_process=in_process, prefix_caching=False) as url:
        asyncio.run(run_load(url, "m", prompts_for(2), 2, 2))
        asyncio.run(run_load(url, "m", prompts_for(1, system), 1, 1))  # the system prompt seen once before
        results, wall = asyncio.run(run_load(url, "m", prefix_prompts, max_tokens, prefix_conc))
        rows.append(
            summarize(
                f"llmctl shared prefix, cache off c={prefix_conc}", results, wall, tokenizer, prefix_prompts
            )
        )
    spec_lines = []
    speculative = [
        ("draft", dict(draft=args.draft, num_draft_tokens=args.num_draft_tokens), args.num_draft_tokens)
    ]
    speculative.append(("prompt lookup", dict(prompt_lookup=args.prompt_lookup), args.prompt_lookup))
    for label, options, k in speculative:
        if not k or (label == "draft" and not args.draft):
            continue
        with LlmctlServer(model, in_process=in_process, **options) as url:
            asyncio.run(run_load(url, "m", prompts_for(2), 2, 2))
            results, wall = asyncio.run(run_load(url, "m", c1_prompts, max_tokens, 1))
            rows.append(summarize(f"llmctl c=1 + {label}", results, wall, tokenizer, c1_prompts))
            with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
                metrics = r.read().decode()

        def counter(name: str, metrics: str = metrics) -> float:
            m = re.search(rf"^llmctl:{name}_total\{{[^}}]*\}} (\S+)$", metrics, re.M)
            return float(m[1]) if m else float("nan")

        drafted, accepted = (
            counter("spec_decode_num_draft_tokens"),
            counter("spec_decode_num_accepted_tokens"),
        )
        plain, spec = rows[0]["out_tok_per_s"], rows[-1]["out_tok_per_s"]
        spec_lines.append(
            f"speculative decoding by {label} (c=1, up to {k} tokens): output {plain:.1f} -> "
            f"{spec:.1f} tok/s ({spec / plain:.2f}x), acceptance {accepted / max(drafted, 1):.1%}"
        )
    peer_row = None
    if not args.quick and not args.no_peer and llama_cpp_available() and model.endswith(".gguf"):
        try:
            with LlamaCppServer(Path(model), n_ctx=4096) as url:
                asyncio.run(run_load(url, "m", prompts_for(2), 2, 2))
                for name, prompts, c in (
                    ("llama.cpp c=1", c1_prompts, 1),
                    (f"llama.cpp c={conc}", cn_prompts, conc),
                ):
                    results, wall = asyncio.run(run_load(url, "m", prompts, max_tokens, c))
                    rows.append(summarize(name, results, wall, tokenizer, prompts))
                peer_row = rows[-1]
        except SystemExit as e:  # the peer failed to start: report llmctl's numbers anyway
            print(f"llama.cpp's server failed: {e}")
    elif not args.quick:
        print("llama.cpp's server skipped (needs llama-cpp-python[server] and a .gguf model)")

    print(f"model: {model}; max_tokens {max_tokens}; greedy; {os.cpu_count()} CPUs")
    print_table(rows)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    by = {r["name"]: r for r in rows}
    scale = by[f"llmctl c={conc}"]["total_tok_per_s"] / by["llmctl c=1"]["total_tok_per_s"]
    on = by[f"llmctl shared prefix, cache on c={prefix_conc}"]["ttft_p50_ms"]
    off = by[f"llmctl shared prefix, cache off c={prefix_conc}"]["ttft_p50_ms"]
    print(f"prefix caching: median TTFT {off:.0f} ms -> {on:.0f} ms ({off / on:.2f}x lower)")
    for line in spec_lines:
        print(line)
    if peer_row is not None:
        print(f"concurrency {conc} vs 1 (llmctl total tokens/s): {scale:.2f}x")
        ratio = by[f"llmctl c={conc}"]["total_tok_per_s"] / peer_row["total_tok_per_s"]
        print(f"llmctl vs llama.cpp server, total tokens/s at concurrency {conc}: {ratio:.2f}x")
    else:
        print(f"concurrency {conc} vs 1 (llmctl total tokens/s): {scale:.2f}x")


if __name__ == "__main__":
    main()
