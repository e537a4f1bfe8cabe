"""Runs API-format prompts through a real ComfyUI's executor, on the CPU, in a fresh process.

Usage: python comfy_runner.py CONFIG.json, with CONFIG holding comfyui (the tree), custom_nodes (a
folder of node packs loaded by ComfyUI's own custom-node loader), models (a folder with
diffusion_models/, loras/, ... subfolders), output, and prompts (a list of API-format graphs).
Prints one JSON line per prompt: {"index", "success", "error"}. With "script" (a Python file
defining run(cfg) -> dict) it runs that instead, after the same start-up, and prints its result.
"""

import asyncio
import json
import os
import sys


def start_gpu() -> None:
    """What ComfyUI's main.py does before and after importing torch on an NVIDIA GPU: its allocator
    settings, then its dynamic VRAM loader (comfy-aimdo) unless turned off."""
    import cuda_malloc  # noqa: F401  (must come before torch)
    import comfy_aimdo.control
    from comfy.cli_args import args, enables_dynamic_vram, get_console_log_level
    if not enables_dynamic_vram():
        return
    headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024 ** 3)
    comfy_aimdo.control.init(simple_vram_headroom=headroom, nvml_pressure=not args.disable_nvml_pressure)
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher
    devices = ((d.index, int(args.vram_headroom * 1024 ** 3)) for d in comfy.model_management.get_all_torch_devices())
    if comfy_aimdo.control.init_devices(devices):
        # Its native log level as main.py sets it from the console's: left at its default, every paging
        # event calls back into Python's logging (some 20 calls per layer and step, all host time).
        level = get_console_log_level(args.verbose)
        setter = {"DEBUG": "set_log_debug", "CRITICAL": "set_log_critical", "ERROR": "set_log_error",
                  "WARNING": "set_log_warning"}.get(level, "set_log_info")
        getattr(comfy_aimdo.control, setter)()
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True


def main() -> None:
    cfg = json.load(open(sys.argv[1]))
    comfy = cfg["comfyui"]
    sys.argv = [sys.argv[0], "--output-directory", cfg["output"], *cfg.get("args", ["--cpu"])]
    sys.path.insert(0, comfy)
    os.chdir(comfy)
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parses the arguments above)
    if "--cpu" not in sys.argv:
        start_gpu()
    import folder_paths
    for kind in ("diffusion_models", "loras", "text_encoders", "vae", "controlnet", "imatrix"):
        folder_paths.add_model_folder_path(kind, os.path.join(cfg["models"], kind), is_default=True)
    import execution
    import nodes

    import runpy

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    for name in sorted(os.listdir(cfg["custom_nodes"])):
        path = os.path.join(cfg["custom_nodes"], name)
        if not asyncio.run(nodes.load_custom_node(path)):
            print(json.dumps({"load_failed": name}), flush=True)

    if "script" in cfg:
        sys.path.insert(0, os.path.dirname(cfg["script"]))
        print(json.dumps({"script": runpy.run_path(cfg["script"])["run"](cfg)}, default=str), flush=True)
        return

    class Server:
        client_id = None
        last_node_id = None

        def send_sync(self, event, data, sid=None):
            if event == "execution_error":
                self.error = data

        def queue_updated(self):
            pass

    server = Server()
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})
    for i, prompt in enumerate(cfg["prompts"]):
        server.error = None
        valid = asyncio.run(execution.validate_prompt(str(i), prompt, None))
        if not valid[0]:
            print(json.dumps({"index": i, "success": False, "error": {"validation": valid[1], "nodes": valid[3]}}),
                  flush=True)
            continue
        executor.execute(prompt, str(i), {}, valid[2])
        errors = [data for event, data in executor.status_messages if event == "execution_error"]
        print(json.dumps({"index": i, "success": executor.success, "error": server.error or (errors or [None])[0]},
                         default=str), flush=True)


if __name__ == "__main__":
    main()
