"""Calibration data and the layer-by-layer runner shared by every data-aware compression method
(GPTQ and AWQ here, SparseGPT and Wanda in ``prune``).

:func:`calibration_ids` turns a JSONL/text file (or a small built-in text) into ``[samples, seq_len]``
token ids. :func:`run_layerwise` then walks the decoder layers of a causal LM one at a time: it captures
the inputs of the first layer once, hands each layer with its inputs to a callback (which may collect
per-linear activations with :meth:`LayerInputs.collect` and change the layer's weights in place), and
re-runs the changed layer to produce the next layer's inputs. Peak memory is the model plus one layer's
activations for the calibration set, never a whole forward's activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmctl.core.errors import InputDataError, ModelError

# A fixed, public-domain-style paragraph for runs without --calib: deterministic, small, good enough for
# smoke tests. Real quantization should pass text like the model's training data.
BUILTIN_TEXT = (
    "The history of science is the study of the development of science and scientific knowledge, "
    "including both the natural and social sciences. Science is a body of empirical, theoretical, and "
    "practical knowledge about the natural world, produced by scientists who emphasize the observation, "
    "explanation, and prediction of real-world phenomena. In the early modern period, the printing press "
    "spread new ideas quickly. Mathematics gave physics its language: numbers, functions, equations such "
    "as 2 + 2 = 4 and F = m * a. A river flows from the mountains to the sea; the weather changes with the "
    'seasons; cities grow along trade routes. She asked, "What is the capital of France?" and he said, '
    '"Paris, of course." Programs are written in languages like Python: def add(a, b): return a + b. '
    "Markets, governments and families shape how people live, work and learn together over centuries. "
)


@dataclass
class CalibrationSpec:
    path: Path | None = None
    text_field: str = "text"
    samples: int = 128
    seq_len: int = 2048


def read_calibration_texts(spec: CalibrationSpec) -> list[str]:
    if spec.path is None:
        return [BUILTIN_TEXT]
    from llmctl.core.io import read_records, resolve_input

    source = resolve_input(str(spec.path))
    return [r.text for r in read_records(source, text_field=spec.text_field) if r.text]


def calibration_ids(tokenizer, spec: CalibrationSpec) -> torch.Tensor:
    """``[samples, seq_len]`` token ids: the documents joined with EOS and cut into consecutive windows.

    A calibration file must hold at least ``samples * seq_len`` tokens (an error names how many it has);
    the built-in text is repeated to fill the windows.
    """
    texts = read_calibration_texts(spec)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = spec.samples * spec.seq_len
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= need:  # the rest of a large file is never used: do not tokenize it
            break
    if not ids:
        raise InputDataError(f"calibration data {spec.path} has no text")
    if len(ids) < need:
        if spec.path is not None:
            raise InputDataError(
                f"calibration file {spec.path} has {len(ids):,} tokens, fewer than --calib-samples "
                f"{spec.samples} x --calib-seq-len {spec.seq_len} = {need:,}; add text or lower them"
            )
        ids = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor(ids[:need], dtype=torch.long).reshape(spec.samples, spec.seq_len)


# --- the layer-by-layer runner ------------------------------------------------------------------------


class _StopForward(Exception):
    pass


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (``model.model.layers`` for Llama-like models)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ModelError(
        f"unsupported architecture {type(model).__name__}: no decoder layer list (model.layers) found"
    )


@dataclass
class LayerInputs:
    """The calibration inputs of one decoder layer: a hidden-state batch and the call's keyword
    arguments (attention mask, position embeddings, ...) per calibration batch."""

    hidden: list[torch.Tensor]  # each [batch, seq, hidden]
    kwargs: list[dict]

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    @torch.no_grad()
    def forward(self, layer: nn.Module, keep: bool = True) -> list[torch.Tensor]:
        """Run ``layer`` on every batch; the outputs (or nothing, with ``keep=False``)."""
        outs = []
        for h, kw in zip(self.hidden, self.kwargs, strict=True):
            out = layer(h, **kw)
            if isinstance(out, tuple):
                out = out[0]
            if keep:
                outs.append(out)
        return outs

    @torch.no_grad()
    def forward_with_pre_hooks(
        self, layer: nn.Module, modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]
    ) -> list[torch.Tensor]:
        """Run ``layer`` on every batch, calling ``fn(name, input)`` for each module in ``modules`` just
        before that module runs; ``fn`` may change the module's weights, and the module and everything
        after it then compute with the new weights. The outputs of the layer are returned.

        With the whole calibration set in one batch, ``fn`` sees every calibration input of a module at
        once, so one forward can quantize each linear on inputs from the already-quantized linears before
        it (GPTQ's true-sequential order) and yield the quantized layer's outputs."""
        with hooks(modules, fn, pre=True):
            return self.forward(layer)

    @torch.no_grad()
    def collect(
        self, layer: nn.Module, modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]
    ) -> None:
        """Run ``layer`` once over the calibration batches, calling ``fn(name, input)`` with the input of
        each module in ``modules`` (``[batch, seq, in_features]``) as it is computed. Each batch's forward
        stops as soon as every module has seen its input, before the last of them runs: the rest of the
        layer is not computed (GPTQ's true-sequential sets would otherwise cost a whole layer forward
        each)."""
        seen: set[str] = set()

        def record(name: str, x: torch.Tensor) -> None:
            fn(name, x)
            seen.add(name)
            if len(seen) == len(modules):
                raise _StopForward

        with hooks(modules, record, pre=True):
            for h, kw in zip(self.hidden, self.kwargs, strict=True):
                seen.clear()
                try:
                    layer(h, **kw)
                except _StopForward:
                    pass


@contextmanager
def hooks(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None], pre: bool = False):
    """Call ``fn(name, input)`` on each module's input, after the module ran (or, with ``pre``, before)."""
    if pre:
        handles = [
            m.register_forward_pre_hook(lambda mod, args, name=name: fn(name, args[0]))
            for name, m in modules.items()
        ]
    else:
        handles = [
            m.register_forward_hook(lambda mod, args, out, name=name: fn(name, args[0]))
            for name, m in modules.items()
        ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture_first_layer_inputs(model, ids: torch.Tensor, batch_size: int) -> LayerInputs:
    """Run the model up to its first decoder layer on each calibration batch and keep that layer's
    arguments; nothing after the first layer is computed."""
    layers = decoder_layers(model)
    hidden, kwargs = [], []

    def grab(module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kw = {k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        kw["use_cache"] = False
        kwargs.append(kw)
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        device = next(model.parameters()).device
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return LayerInputs(hidden, kwargs)


@torch.no_grad()
def run_layerwise(
    model,
    ids: torch.Tensor,
    on_layer: Callable[[int, nn.Module, LayerInputs], list[torch.Tensor] | None],
    *,
    batch_size: int = 8,
    progress: Callable[[], None] | None = None,
) -> None:
    """Call ``on_layer(index, layer, inputs)`` for each decoder layer in order; ``inputs`` are produced
    by the already-processed (for example quantized) earlier layers. ``on_layer`` may return the
    processed layer's outputs (per batch) when it computed them anyway; otherwise the layer is re-run."""
    inputs = capture_first_layer_inputs(model, ids, batch_size)
    for index, layer in enumerate(decoder_layers(model)):
        outputs = on_layer(index, layer, inputs)
        inputs = LayerInputs(inputs.forward(layer) if outputs is None else outputs, inputs.kwargs)
        if progress:
            progress()


def linears_of(layer: nn.Module, skip: Iterable[str] = ()) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of a layer by their name inside it, minus names matching ``skip``."""
    skip = tuple(skip)
    return {
        name: m
        for name, m in layer.named_modules()
        if isinstance(m, nn.Linear) and not any(s and (name == s or name.endswith("." + s)) for s in skip)
    }
