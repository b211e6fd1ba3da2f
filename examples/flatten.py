"""Prune FLatten-DeiT-T and FLatten-Swin-T (linear + softmax attention); the same table as examples/deit.py.

The depthwise conv on V that all heads share is untied first (numerically identical), so heads may choose
their own channels and whole heads can go. The masked error is against zeroed activations: FLatten's
ReLU(x) + ε makes zeroed weights differ from removal (README, known limits).

    python examples/flatten.py                                          # FLatten-DeiT-T
    python examples/flatten.py --model flatten_swin_tiny_patch4_window7_224
"""
from deit import main

import fxprune.models  # noqa: F401  (registers the FLatten models with timm)

if __name__ == "__main__":
    main(default_model="flatten_deit_tiny_patch16_224", default_settings="0.3:0 0.5:0 0:0.5 0.3:0.5",
         untie=True, activation_reference=True)
