"""Small random-init Hugging Face transformers for the property tests and benchmarks/hf.py (no hub access).

``build(family, arch, attention)`` makes a model from a config of the drawn sizes, with weights re-drawn at
unit scale (``randomize``); ``inputs(family, batch, seq, generator)`` makes positional inputs in the order of
the model's ``forward``. Importing this module needs ``transformers``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

IMAGE, PATCH = 32, 8      # 4 x 4 patches (Swin: patch 4, so 8 x 8 tokens in windows of 4)
VOCAB, POSITIONS = 40, 32  # token ids are drawn from [FIRST_ID, VOCAB); sequences stay below POSITIONS
FIRST_ID = 3               # ids 0-2 are special (padding, bos, eos) in some families: keep them out


@dataclass(frozen=True)
class Arch:
    """The drawn sizes; ``variant`` switches the family's optional feature (see ``Family.variant``)."""

    heads: int = 2
    head_dim: int = 8
    layers: int = 1
    intermediate: int = 24
    kv_groups: int = 1      # query heads per key/value head (decoders; 1 is plain multi-head attention)
    variant: bool = False

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class Family:
    name: str
    kind: str                             # "vision", "encoder" (ids + padded mask) or "decoder" (ids)
    model: str                            # transformers class of the bare model (outputs at every token)
    config: str                           # its config class
    kwargs: Callable[[Arch], dict]        # config arguments for the drawn sizes
    variant: str = ""                     # what Arch.variant switches on, "" where nothing

    @property
    def model_class(self) -> type:
        return getattr(transformers, self.model)

    @property
    def gqa(self) -> bool:
        """Whether the config sets the key/value head count apart from the query heads'."""
        return "num_key_value_heads" in self.kwargs(Arch())

    @property
    def attentions(self) -> tuple[str, ...]:
        """The attention implementations transformers offers for the family (besides flash, which needs CUDA)."""
        return ("eager", "sdpa") if getattr(self.model_class, "_supports_sdpa", False) else ("eager",)


def _vit_like(a: Arch) -> dict:
    return dict(image_size=IMAGE, patch_size=PATCH, hidden_size=a.hidden, num_hidden_layers=a.layers,
                num_attention_heads=a.heads, intermediate_size=a.intermediate)


def _swin_like(a: Arch) -> dict:
    """Two stages (the second after patch merging, with twice the heads); ``layers`` blocks in the first,
    so two layers bring the shifted-window block with its attention mask."""
    return dict(image_size=IMAGE, patch_size=4, embed_dim=a.hidden, depths=(a.layers, 1),
                num_heads=(a.heads, 2 * a.heads), window_size=4, mlp_ratio=a.intermediate / a.hidden, drop_path_rate=0.0)


def _bert_like(a: Arch) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                intermediate_size=a.intermediate, max_position_embeddings=POSITIONS + 2)  # RoBERTa offsets by 2


def _decoder(a: Arch) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=a.hidden, head_dim=a.head_dim, num_hidden_layers=a.layers,
                num_attention_heads=a.heads, num_key_value_heads=a.heads // a.kv_groups,
                intermediate_size=a.intermediate, max_position_embeddings=POSITIONS)


FAMILIES = {f.name: f for f in (
    Family("ViT", "vision", "ViTModel", "ViTConfig", lambda a: {**_vit_like(a), "qkv_bias": a.variant},
           variant="q/k/v bias"),
    Family("DeiT", "vision", "DeiTModel", "DeiTConfig", lambda a: {**_vit_like(a), "qkv_bias": a.variant},
           variant="q/k/v bias"),
    Family("Dinov2", "vision", "Dinov2Model", "Dinov2Config",
           lambda a: {**_vit_like(a), "intermediate_size": None, "mlp_ratio": max(1, round(a.intermediate / a.hidden)),
                      "use_swiglu_ffn": a.variant}, variant="SwiGLU MLP"),
    Family("Swin", "vision", "SwinModel", "SwinConfig", _swin_like),
    Family("Swinv2", "vision", "Swinv2Model", "Swinv2Config", _swin_like),
    Family("BEiT", "vision", "BeitModel", "BeitConfig",
           lambda a: {**_vit_like(a), "use_relative_position_bias": True, "use_mean_pooling": a.variant,
                      "drop_path_rate": 0.0},
           variant="mean pooling (else the class token)"),
    Family("CLIP-vision", "vision", "CLIPVisionModel", "CLIPVisionConfig", _vit_like),
    Family("SigLIP-vision", "vision", "SiglipVisionModel", "SiglipVisionConfig",
           lambda a: {**_vit_like(a), "vision_use_head": a.variant}, variant="attention-pooling head"),
    Family("BERT", "encoder", "BertModel", "BertConfig", _bert_like),
    Family("RoBERTa", "encoder", "RobertaModel", "RobertaConfig", lambda a: {**_bert_like(a), "pad_token_id": 1}),
    Family("DistilBERT", "encoder", "DistilBertModel", "DistilBertConfig",
           lambda a: dict(vocab_size=VOCAB, dim=a.hidden, n_layers=a.layers, n_heads=a.heads, hidden_dim=a.intermediate,
                          max_position_embeddings=POSITIONS, sinusoidal_pos_embds=a.variant),
           variant="sinusoidal positions"),
    Family("GPT-2", "decoder", "GPT2Model", "GPT2Config",
           lambda a: dict(vocab_size=VOCAB, n_embd=a.hidden, n_layer=a.layers, n_head=a.heads, n_inner=a.intermediate,
                          n_positions=POSITIONS)),
    Family("Llama", "decoder", "LlamaModel", "LlamaConfig",
           lambda a: {**_decoder(a), "attention_bias": a.variant}, variant="q/k/v/o bias"),
    Family("Mistral", "decoder", "MistralModel", "MistralConfig",
           lambda a: {**_decoder(a), "sliding_window": 4 if a.variant else None}, variant="sliding window of 4"),
    Family("Qwen2", "decoder", "Qwen2Model", "Qwen2Config", _decoder),
    Family("Qwen3", "decoder", "Qwen3Model", "Qwen3Config", _decoder),
    # interleaved rotary embeddings (x[..., ::2] and x[..., 1::2] rotated as pairs, cos/sin repeat_interleave'd)
    Family("GPT-J", "decoder", "GPTJModel", "GPTJConfig",
           lambda a: dict(vocab_size=VOCAB, n_embd=a.hidden, n_layer=a.layers, n_head=a.heads, n_inner=a.intermediate,
                          n_positions=POSITIONS, rotary_dim=a.head_dim // 2 if a.variant else a.head_dim,
                          bos_token_id=1, eos_token_id=2),
           variant="rotary on half of each head (x[..., :rotary_dim] rotated, the rest passed)"),
    Family("GPT-NeoX", "decoder", "GPTNeoXModel", "GPTNeoXConfig",
           lambda a: dict(vocab_size=VOCAB, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                          intermediate_size=a.intermediate, max_position_embeddings=POSITIONS,
                          rotary_pct=0.5 if a.variant else 1.0, bos_token_id=1, eos_token_id=2),
           variant="rotate_half on half of each head"),
    Family("Cohere", "decoder", "CohereModel", "CohereConfig", _decoder),
    # one fused qkv_proj sliced by position into q, k (a middle range) and v; one gate_up_proj chunked in two
    Family("Phi-3", "decoder", "Phi3Model", "Phi3Config",
           lambda a: {**_decoder(a), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
)}


def build(family: str | Family, arch: Arch = Arch(), attention: str = "eager", seed: int = 0) -> nn.Module:
    """The family's bare model for ``arch`` with ``attention`` ("eager" or "sdpa"), randomized, in eval mode."""
    family = FAMILIES[family] if isinstance(family, str) else family
    config = getattr(transformers, family.config)(**family.kwargs(arch), attn_implementation=attention)
    model = family.model_class(config)
    assert model.config._attn_implementation == attention, (family.name, model.config._attn_implementation)
    return randomize(model, seed).eval()


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights of unit-scale activations. The HF init (std 0.02) makes every attention nearly uniform, which
    would hide a misaligned head or a wrong softmax scale from the equivalence checks (as tests/helpers.py
    ``randomize`` for timm; here by module type, since HF names differ per family)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=generator)
                p.copy_(_redrawn(module, name, p, noise))
    return model


def _redrawn(module: nn.Module, name: str, p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    if name == "weight" and isinstance(module, (nn.Linear, nn.Conv2d)):
        return noise * (1.5 / p[0].numel() ** 0.5)   # fan-in: everything but the output dim
    if name == "weight" and isinstance(module, Conv1D):  # GPT-2's Linear, stored (in, out)
        return noise * (1.5 / p.shape[0] ** 0.5)
    if name == "weight" and isinstance(module, nn.Embedding):
        return noise
    if name == "weight" and "norm" in type(module).__name__.lower():  # LayerNorm, RMSNorm
        return 1 + 0.3 * noise
    if name == "logit_scale":  # Swin-v2's cosine-attention temperature: near its init (log 10), not near 1
        return p + 0.3 * noise
    return 0.5 * noise  # biases, tokens, position tables, layer scales


def inputs(family: str | Family, batch: int, seq: int, generator: torch.Generator) -> tuple:
    """Positional inputs: images for vision (``seq`` unused), token ids for decoders, and for encoders ids with
    an attention mask in which every row but the first pads its last tokens (some with padding, one without)."""
    family = FAMILIES[family] if isinstance(family, str) else family
    if family.kind == "vision":
        return (torch.randn(batch, 3, IMAGE, IMAGE, generator=generator),)
    ids = torch.randint(FIRST_ID, VOCAB, (batch, seq), generator=generator)
    if family.kind == "decoder":
        return (ids,)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(0 if batch == 1 else 1, batch):  # a batch of one pads too, or the trace sees no padding
        pads = int(torch.randint(1, max(2, seq // 2), (), generator=generator))
        mask[row, seq - pads:] = 0
    return ids, mask
