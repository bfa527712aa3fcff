import pytest

from llmctl.core.errors import LlmctlError, UsageError
from llmctl.kernels import dispatch


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(dispatch, "_REGISTRY", {})
    dispatch.register_kernel("double", torch=lambda x: ("torch", 2 * x), triton=lambda x: ("triton", 2 * x))
    dispatch.register_kernel("half", torch=lambda x: ("torch", x / 2))
    return dispatch


def test_auto_uses_triton_only_on_cuda_when_triton_is_installed(registry, monkeypatch):
    monkeypatch.delenv("LLMCTL_KERNELS", raising=False)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert registry.get_kernel("double", on_cuda=True)(3) == ("triton", 6)
    assert registry.get_kernel("double", on_cuda=False)(3) == ("torch", 6)
    assert registry.get_kernel("half", on_cuda=True)(3) == ("torch", 1.5)  # no fast path yet
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert registry.get_kernel("double", on_cuda=True)(3) == ("torch", 6)


def test_env_var_forces_a_backend(registry, monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setenv("LLMCTL_KERNELS", "torch")
    assert registry.get_kernel("double", on_cuda=True)(1)[0] == "torch"
    monkeypatch.setenv("LLMCTL_KERNELS", "triton")
    assert registry.get_kernel("double", on_cuda=False)(1)[0] == "triton"
    with pytest.raises(LlmctlError, match="no Triton implementation"):
        registry.get_kernel("half", on_cuda=False)
    monkeypatch.setenv("LLMCTL_KERNELS", "cuda")
    with pytest.raises(UsageError):
        registry.get_kernel("double", on_cuda=False)


def test_unknown_kernel_and_double_registration_fail_loudly(registry):
    with pytest.raises(LlmctlError, match="unknown kernel 'nope'"):
        registry.get_kernel("nope", on_cuda=False)
    with pytest.raises(ValueError):
        registry.register_kernel("double", torch=abs)


def test_importing_the_kernels_package_pulls_in_neither_the_cli_nor_optional_dependencies():
    """The GPU machine has only torch and triton: ``import llmctl.kernels`` must need nothing else."""
    import subprocess
    import sys

    code = (
        "import sys, llmctl.kernels; "
        "bad = [m for m in ('typer', 'rich', 'transformers', 'datasketch', 'bitsandbytes', 'llmctl.cli', "
        "'llmctl.commands', 'yaml', 'gguf') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
