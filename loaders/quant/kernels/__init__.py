"""The Triton kernels (CUDA): dequantization, the fused quantized matmul, fp8 activation scaling, and
the encoders' in-order sums.

Importing this package imports no Triton; its modules do. ``loaders.compat.triton_kernels()`` says
once whether they can run here."""
