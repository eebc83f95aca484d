"""The data plane: stage worker processes, the tensor hand-off, model stages, video encoding and upload."""

import logging

# Importing diffusers imports torchao (its quantizer module loads it whenever it is installed), and on a
# CPU build of torch torchao warns on every process start that its CUDA kernels (mxfp8, cutlass) cannot
# load, diffusers adds that torchao's tensor types are missing, and torch notes a deprecated enum
# registration. None of it concerns a farm that quantizes with torchao's portable kernels, yet it
# buried every CLI error under five lines of noise. Real errors from these libraries still show.
for _noisy in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
