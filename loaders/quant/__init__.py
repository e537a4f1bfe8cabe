"""Quantized weights: the registry of formats (``formats``: one class per GGUF block type; FP8 rows
in ``fp8``), the quantized weight tensor (``weight``), a layer's execution plan (``plan``), the
Triton kernels (``kernels``), encoders for writing (``encode``), conversions at load (``convert``)
and finding damaged weights (``health``)."""
