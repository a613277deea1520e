"""The CUDA backend's kernels, written in Triton.

Imported only where the cuda backend is chosen (or by its tests): a CPU install needs no Triton.
Every kernel here also runs under Triton's interpreter (`TRITON_INTERPRET=1`) on CPU tensors, which
is how the test suite checks them on machines without a GPU (float32 only: the interpreter's bf16
results are not meaningful).
"""
