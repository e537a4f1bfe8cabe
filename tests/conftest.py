"""The suite: ``unit/`` tests the library alone, ``integration/`` runs it inside real ComfyUI (its
tiny models are written by ``integration/conftest.py``). The modules beside this file serve both:
tiny random models and text encoders (tiny_models, tiny_text_encoders), llama.cpp's reference
quantizer (llama_cpp_ref), a started ComfyUI and the graphs run in it (comfy_env, comfy_runner,
comfy_server, comfy_graphs), a stand-in for Hugging Face (hf_mirror) and the fuzzer (fuzz_gguf).

Under CI=true a test may skip only for want of a GPU or of city96's ComfyUI-GGUF (on no registry CI
reaches): a ComfyUI or browser test that skips there means CI did not set up what it must, and counts
as a failure."""

from __future__ import annotations

import os

import pytest

# The CUDA / fp8 / Triton-kernel tests name the GPU (or Hopper); the interpreter run skips its own caller;
# test_city96_loader names city96.
ALLOWED_SKIP = ("GPU", "Hopper", "interpreter", "city96's ComfyUI-GGUF is not at hand")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(word in reason for word in ALLOWED_SKIP):
            report.outcome = "failed"
            report.longrepr = f"skipped under CI=true, where every non-GPU test must run: {reason}"


@pytest.fixture(scope="session")
def checkout(tmp_path_factory):
    """This working tree as a git repository of one commit: what a user clones (install.sh installs a
    checkout's commits, so uncommitted changes must be in one to be tested)."""
    import shutil
    import subprocess
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    dest = tmp_path_factory.mktemp("clone") / "ComfyUI-QwenImage-GGUF"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = repo / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(dest)], check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "snapshot"], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="session")
def lib():
    """llama.cpp's quantizers compiled from its sources (llama_cpp_ref), skipping where they cannot be."""
    import llama_cpp_ref
    built = llama_cpp_ref.reference()
    if built is None:
        pytest.skip(llama_cpp_ref.why_not)
    return built
