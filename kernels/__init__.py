"""ltx-lora's Triton kernels for the LTX-2 transformer's hot paths (fused attention with RoPE, norms, modulation).

Not the Hugging Face `kernels` package: that one is a distribution named `kernels` which diffusers probes for by
version; this folder ships inside the `ltx-lora` distribution, so diffusers' probe finds no `kernels` version and
does not take it for the Hub kernels (tests/test_packaging.py checks that).
"""

LTX_LORA_KERNELS = True
