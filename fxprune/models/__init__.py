"""Models fxprune ships (registered with timm on import, so ``timm.create_model`` finds them)."""
from .flatten import (FocusedLinearAttention, flatten_deit_small_patch16_224, flatten_deit_tiny_patch16_224,
                      flatten_swin_tiny_patch4_window7_224)

__all__ = ["FocusedLinearAttention", "flatten_deit_tiny_patch16_224", "flatten_deit_small_patch16_224",
           "flatten_swin_tiny_patch4_window7_224"]
