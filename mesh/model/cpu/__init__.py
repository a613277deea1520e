"""The CPU backend: small C kernels (AVX-512 / AVX512-BF16 / AMX, AVX2 + FMA builds) behind the same
operations as the torch reference backend. `native` builds and loads them; `backend` maps the model's
operations onto them."""
