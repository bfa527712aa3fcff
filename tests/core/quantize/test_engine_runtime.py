"""llmctl's own engine (``load_decoder``: generate and serve) on quantized checkpoints: the same greedy
tokens as transformers running the same checkpoint through ``load_quantized``, for every format."""

import json
import urllib.request

import pytest
import torch

from llmctl.core.generate.engine import Request, generate
from llmctl.core.generate.run import load_engine
from llmctl.core.generate.sampling import SamplingParams
from llmctl.core.quantize.calib import CalibrationSpec
from tests.conftest import read_jsonl, write_jsonl
from tests.core.generate._models import sharp_llama

PROMPTS = ["Hello there", "The quick brown fox", "x"]
CASES = ["gptq-act-order", "awq", "ct-int4-asym", "ct-int8", "fp8"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A sharp tiny llama (clear greedy winners) quantized once per format: name -> directory. On the CPU
    the engine runs QuantLinear with its dequantized weight cached."""
    from llmctl.core.quantize import QuantizeOptions, quantize_model

    root = tmp_path_factory.mktemp("qengine")
    fp = sharp_llama(root / "fp", seed=3)
    calib = CalibrationSpec(None, samples=4, seq_len=32)
    cases = {
        "gptq-act-order": QuantizeOptions(method="gptq", group_size=32, act_order=True, calib=calib),
        "awq": QuantizeOptions(method="awq", group_size=32, calib=calib),
        "ct-int4-asym": QuantizeOptions(method="rtn", group_size=32, sym=False, fmt="compressed-tensors"),
        "ct-int8": QuantizeOptions(method="rtn", bits=8, group_size=-1, fmt="compressed-tensors"),
        "fp8": QuantizeOptions(method="fp8"),
    }
    for name, opts in cases.items():
        quantize_model(str(fp), root / name, opts)
    return {name: root / name for name in cases}


def _transformers_greedy(directory, prompts, max_new):
    from transformers import AutoTokenizer

    from llmctl.core.quantize.runtime import load_quantized

    model = load_quantized(directory, kernel=False)  # the reference QuantLinear path
    tokenizer = AutoTokenizer.from_pretrained(directory)
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt")["input_ids"]
            row = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=None,
                                 pad_token_id=tokenizer.pad_token_id)[0]  # fmt: skip
            out.append(row[ids.shape[1] :].tolist())
    return out


@pytest.mark.parametrize("name", CASES)
def test_engine_greedy_tokens_equal_transformers_on_the_same_quantized_checkpoint(quantized, name):
    from llmctl.core.quantize.runtime import QuantLinear

    engine = load_engine(str(quantized[name]), device="cpu")
    linears = [m for m in engine.model.modules() if isinstance(m, QuantLinear) or "W4A16" in type(m).__name__]
    assert len(linears) == 14  # 2 layers x 7 linears; lm_head (tied) stays plain
    ids = [engine.tokenizer(p)["input_ids"] for p in PROMPTS]
    ours = generate(engine, [Request(i, SamplingParams(max_tokens=12, ignore_eos=True)) for i in ids])
    expected = _transformers_greedy(quantized[name], PROMPTS, 12)
    assert [c.token_ids for c in ours] == expected
    assert len({t for row in expected for t in row}) > 3  # not a degenerate repeat of one token


def test_engine_keeps_fp8_weights_as_bytes_whatever_the_dtype(quantized):
    from llmctl.core.generate.model import load_decoder
    from llmctl.core.models.hf import resolve_model
    from llmctl.core.quantize.runtime import QuantLinear

    model, _ = load_decoder(resolve_model(quantized["fp8"]), device="cpu", dtype="bfloat16")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.qweight.dtype == torch.uint8
    assert q.quantized_weight().qweight.dtype == torch.float8_e4m3fn


def test_llmctl_generate_cli_runs_a_gptq_checkpoint_like_transformers(cli, quantized, tmp_path):
    from transformers import AutoTokenizer

    directory = quantized["gptq-act-order"]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    result = cli("generate", directory, path, "--max-tokens", "10", "--ignore-eos", "--temperature", "0")
    assert result.exit_code == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(directory)
    expected = [
        tokenizer.decode(t, skip_special_tokens=True) for t in _transformers_greedy(directory, PROMPTS, 10)
    ]
    assert [r["completion"] for r in read_jsonl(result.stdout)] == expected


def test_serve_answers_a_completion_on_a_quantized_model(quantized):
    from llmctl.core.serve.engine import ServeConfig
    from llmctl.core.serve.server import create_server, start_in_thread

    engine = load_engine(str(quantized["awq"]), device="cpu")
    config = ServeConfig(block_size=16, num_blocks=32, max_num_seqs=4, max_num_batched_tokens=64)
    server = start_in_thread(create_server(engine, config, port=0, model_name="q", api_key=None))
    try:
        body = json.dumps({"model": "q", "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0})
        request = urllib.request.Request(
            server.url + "/v1/completions", data=body.encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
    finally:
        server.stop()
    ids = engine.tokenizer(PROMPTS[1])["input_ids"]
    (reference,) = generate(engine, [Request(ids, SamplingParams(max_tokens=8))])
    assert answer["choices"][0]["text"] == reference.text
    assert answer["usage"]["completion_tokens"] == len(reference.token_ids)


@pytest.mark.parametrize("name", ["gptq-act-order", "awq"])
def test_engine_on_the_w4a16_kernel_module_gives_the_same_tokens(quantized, name, monkeypatch):
    pytest.importorskip("llmctl.kernels.w4a16")
    from llmctl.core.quantize import runtime

    install = runtime.QuantizedCheckpoint.install  # on the CPU the engine caches dense weights; force the
    monkeypatch.setattr(  # module CUDA gets (its torch reference runs here)
        runtime.QuantizedCheckpoint, "install", lambda self, model, dtype, **kw: install(self, model, dtype)
    )
    engine = load_engine(str(quantized[name]), device="cpu")
    assert sum("W4A16" in type(m).__name__ for m in engine.model.modules()) == 14
    ids = [engine.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    ours = generate(engine, [Request(i, SamplingParams(max_tokens=8, ignore_eos=True)) for i in ids])
    assert [c.token_ids for c in ours] == _transformers_greedy(quantized[name], PROMPTS[:2], 8)


@pytest.mark.parametrize("name", ["gptq-act-order", "awq", "ct-int4-asym"])
def test_load_model_on_the_cpu_dequantizes_once_with_the_same_logits(quantized, name):
    """``llmctl eval``'s loader: on the CPU every QuantLinear keeps its dequantized weight (no per-forward
    dequantization) and the logits equal the uncached reference path's."""
    from llmctl.core.models.hf import load_model, resolve_model
    from llmctl.core.quantize.runtime import QuantLinear, load_quantized

    model = load_model(resolve_model(str(quantized[name])), device="cpu")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(getattr(m, "dense", None) is not None for m in layers)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        got = model(ids).logits
        want = load_quantized(quantized[name], kernel=False)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
