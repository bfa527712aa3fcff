"""Calibration data, the layer-by-layer runner, AWQ's scale folding and clipping, and loading quantized
checkpoints back (llmctl's runtime and transformers with compressed-tensors)."""

import json

import pytest
import torch

from llmctl.core.errors import InputDataError
from llmctl.core.quantize.calib import CalibrationSpec, calibration_ids, decoder_layers, run_layerwise


@pytest.fixture(scope="module")
def fp(tiny_model):
    from llmctl.core.models.hf import load_model, load_tokenizer, resolve_model

    ref = resolve_model(tiny_model)
    return load_model(ref, device="cpu", dtype="float32"), load_tokenizer(ref)


def _fresh(tiny_model):
    from llmctl.core.models.hf import load_model, resolve_model

    return load_model(resolve_model(tiny_model), device="cpu", dtype="float32")


def test_calibration_ids_are_deterministic_windows_of_the_file(fp, tmp_path):
    _, tok = fp
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(10)))
    spec = CalibrationSpec(path, "text", samples=3, seq_len=16)
    ids = calibration_ids(tok, spec)
    assert ids.shape == (3, 16) and torch.equal(ids, calibration_ids(tok, spec))
    first = tok("document 0 " * 20, add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == first[:16]


def test_a_calibration_file_too_small_is_an_input_error_and_builtin_text_fills(fp, tmp_path):
    _, tok = fp
    path = tmp_path / "small.jsonl"
    path.write_text(json.dumps({"text": "short"}) + "\n")
    with pytest.raises(InputDataError, match="small.jsonl has .* fewer than --calib-samples 4"):
        calibration_ids(tok, CalibrationSpec(path, "text", samples=4, seq_len=64))
    assert calibration_ids(tok, CalibrationSpec(None, samples=8, seq_len=512)).shape == (8, 512)


def test_layerwise_runner_feeds_each_layer_the_previous_layers_outputs(fp):
    model, tok = fp
    ids = calibration_ids(tok, CalibrationSpec(None, samples=3, seq_len=24))
    seen = []
    run_layerwise(model, ids, lambda i, layer, inputs: seen.append(torch.cat(inputs.hidden)), batch_size=2)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert len(seen) == len(decoder_layers(model))
    for i, x in enumerate(seen):  # hidden_states[i] is the input of layer i
        assert torch.allclose(x, hidden[i], atol=1e-5)


def test_awq_scale_folding_leaves_the_fp_layer_unchanged(tiny_model):
    from llmctl.core.quantize.awq import _fold, llama_groups

    model = _fresh(tiny_model)
    layer = decoder_layers(model)[0]
    x = torch.randn(2, 10, model.config.hidden_size)
    rotary = model.model.rotary_emb(x, torch.arange(10)[None].expand(2, -1))
    with torch.no_grad():
        before = layer(x, position_embeddings=rotary)
        for prev, linears, _ in llama_groups(layer):
            _fold(prev, linears, torch.rand(linears[0].in_features) * 3 + 0.2)
        after = layer(x, position_embeddings=rotary)
    before = before[0] if isinstance(before, tuple) else before
    after = after[0] if isinstance(after, tuple) else after
    assert torch.allclose(before, after, atol=1e-5)


def test_awq_clip_search_never_increases_a_groups_output_error():
    from llmctl.core.quantize.awq import _apply_clip, awq_fake_quantize, search_clip

    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 16, bias=False)
    lin.weight.data = torch.randn(16, 64, generator=gen) * torch.where(
        torch.rand(16, 64, generator=gen) > 0.97, 6, 1
    )
    x = torch.randn(300, 64, generator=gen)
    plain = (x @ awq_fake_quantize(lin.weight.data, 4, 16).T - x @ lin.weight.data.T).pow(2).sum()
    w0 = lin.weight.data.clone()
    _apply_clip(lin, search_clip(lin, x, bits=4, group_size=16), 16)
    clipped = (x @ awq_fake_quantize(lin.weight.data, 4, 16).T - x @ w0.T).pow(2).sum()
    assert clipped < plain


def test_awq_scale_search_of_a_lone_linear_by_gram_matrix_picks_the_forward_searchs_scales():
    from llmctl.core.quantize.awq import search_scales

    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(64, 24)
    lin.weight.data = torch.randn(24, 64, generator=gen) * torch.where(
        torch.rand(24, 64, generator=gen) > 0.95, 5, 1
    )
    x = [torch.randn(2, 40, 64, generator=gen) * torch.linspace(0.1, 8, 64) for _ in range(3)]
    w0 = lin.weight.data.clone()
    by_forward = search_scales([lin], x, lambda i: lin(x[i]), bits=3, group_size=16)
    by_gram = search_scales([lin], x, None, bits=3, group_size=16, linear_block=True)
    assert torch.equal(lin.weight.data, w0)  # the search leaves the weights as they were
    assert not torch.equal(by_forward, torch.ones(64))  # a real choice was made
    assert torch.allclose(by_forward, by_gram)


@pytest.fixture(scope="module")
def written(tiny_model, tmp_path_factory):
    """Each method quantized once and written in its format: (directory, in-memory quantized model)."""
    from llmctl.core.quantize import QuantizeOptions, quantize_model

    root = tmp_path_factory.mktemp("quantized")
    calib = CalibrationSpec(None, samples=4, seq_len=32)
    cases = {
        "gptq-act-order": QuantizeOptions(method="gptq", group_size=32, act_order=True, calib=calib),
        "awq": QuantizeOptions(method="awq", group_size=32, calib=calib),
        "rtn-ct": QuantizeOptions(method="rtn", bits=8, group_size=32, fmt="compressed-tensors"),
        "fp8": QuantizeOptions(method="fp8"),
    }
    out = {}
    for name, opts in cases.items():
        summary = quantize_model(str(tiny_model), root / name, opts)
        out[name] = (root / name, summary)
    return out


def _dequantized_reference(tiny_model, directory):
    """The fp model with each quantized linear's weight replaced by the dequantized tensors read back."""
    from llmctl.core.quantize.runtime import QuantLinear, load_quantized

    quantized = load_quantized(directory, kernel=False)
    model = _fresh(tiny_model)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, QuantLinear):
                model.get_submodule(name).weight.copy_(module.quantized_weight().dequantize())
        for name, p in quantized.named_parameters():  # AWQ folded scales into the norms
            model.get_parameter(name).copy_(p)
    return quantized, model


@pytest.mark.parametrize("name", ["gptq-act-order", "awq", "rtn-ct", "fp8"])
def test_load_quantized_runs_every_format_like_its_dequantized_weights(tiny_model, written, name):
    from llmctl.core.quantize.runtime import QuantLinear

    directory, summary = written[name]
    quantized, reference = _dequantized_reference(tiny_model, directory)
    n = sum(isinstance(m, QuantLinear) for m in quantized.modules())
    assert n == summary["layers_quantized"] == 14
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(quantized(ids).logits, reference(ids).logits, atol=1e-4)
    qc = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == {"gptq-act-order": "gptq", "awq": "awq"}.get(name, "compressed-tensors")
    assert (directory / "tokenizer.json").is_file() and (directory / "llmctl.json").is_file()


@pytest.mark.parametrize("name", ["gptq-act-order", "awq", "rtn-ct"])
def test_the_w4a16_kernel_module_gives_the_reference_modules_logits(written, name):
    pytest.importorskip("llmctl.kernels.w4a16")
    from llmctl.core.quantize.runtime import QuantLinear, load_quantized

    directory, _ = written[name]
    fast, reference = load_quantized(directory), load_quantized(directory, kernel=False)
    assert not any(isinstance(m, QuantLinear) for m in fast.modules())
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(fast(ids).logits, reference(ids).logits, atol=1e-4)


def test_quantized_model_stays_close_to_the_fp_model(tiny_model, written, fp):
    from llmctl.core.quantize.runtime import load_quantized

    model, _ = fp
    ids = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        err8 = (load_quantized(written["rtn-ct"][0])(ids).logits - ref).abs().max()
        err4 = (load_quantized(written["gptq-act-order"][0])(ids).logits - ref).abs().max()
    assert err8 < err4 < ref.abs().max()


@pytest.mark.parametrize("name", ["rtn-ct", "fp8"])
def test_transformers_with_compressed_tensors_loads_the_output_with_the_same_logits(written, name):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from llmctl.core.quantize.runtime import load_quantized

    directory, _ = written[name]
    theirs = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
    ours = load_quantized(directory)
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids).logits, atol=1e-5)


def test_collect_stops_each_batch_once_every_module_has_seen_its_input(fp):
    from llmctl.core.quantize.calib import capture_first_layer_inputs

    model, tok = fp
    ids = calibration_ids(tok, CalibrationSpec(None, samples=3, seq_len=16))
    inputs = capture_first_layer_inputs(model, ids, batch_size=2)
    layer = decoder_layers(model)[0]
    later = []
    handle = layer.mlp.down_proj.register_forward_hook(lambda *a: later.append(1))
    seen = []
    try:
        inputs.collect(
            layer, {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj}, lambda n, x: seen.append(n)
        )
    finally:
        handle.remove()
    assert seen == ["q", "k"] * len(inputs.hidden) and not later  # the MLP never ran
