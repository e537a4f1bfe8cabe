"""The NaN Guard node."""

from __future__ import annotations

from comfy_api.latest import io

from .integration.guard import add_guard


class NaNGuard(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QwenImageGGUFNaNGuard",
            display_name="NaN Guard",
            category="advanced/model",
            description="Checks every sampling step: an output holding NaN or inf is recomputed in fp32; if that "
                        "fails too, sampling stops with an error naming the step, the sigma and the likely "
                        "cause, instead of producing a black image. Costs one isfinite check per step.",
            inputs=[io.Model.Input("model")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(add_guard(model))
