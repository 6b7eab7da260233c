"""ltx-lora's Triton kernels for the LTX-2 transformer's hot paths (fused attention with RoPE, norms, modulation).

Named `ltx_kernels`, not `kernels`: `kernels` is the Hugging Face package that transformers (5.25 on) depends on and
imports by that name, so a folder of ours called `kernels` would shadow it wherever the project root is on sys.path
(tests/test_packaging.py checks that transformers and diffusers import from the project root).
"""
