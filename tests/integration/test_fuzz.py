"""A short fuzz campaign in the suite (tests/fuzz_gguf.py runs long ones): seeded mutations of small
valid files of every kind, each loaded through ComfyUI and run once, or refused with a GGUFError
naming the file."""

from comfy_env import requires_comfyui
from fuzz_gguf import campaign


@requires_comfyui
def test_mutated_files_run_or_get_a_clear_error(tmp_path):
    result = campaign(cases=2000, seed=0, workers=2, workdir=tmp_path)
    assert not result["findings"], result["findings"][:5]
    counts = result["by_kind"]
    for kind in ("qwen_image", "z_image", "text_encoder", "mmproj", "vae_gguf", "vae_safetensors"):
        # Both outcomes for every kind, or the mutations miss what they should reach.
        assert counts.get(f"{kind}: ran", 0) > 20 and counts.get(f"{kind}: GGUFError", 0) > 20, counts
