"""A Hugging Face BERT with padded batches: prune heads and channels, then run the pruned module at other
batch sizes and lengths with an attention mask, against the masked original.

    python examples/hf_bert.py        # random init from a config (model hubs are unreachable here)

The example inputs are positional, in forward's order: (input_ids, attention_mask). The pruned module is a
torch.fx.GraphModule that takes the same arguments and returns the same output object.
"""
from __future__ import annotations

import torch

import fxprune


def batch(size: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with the tail of every other sequence padded out."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (size, length), generator=generator)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[1::2, length // 2:] = 0
    return ids, mask


def main() -> None:
    import transformers

    config = transformers.BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1024,
                                     vocab_size=1000)
    config._attn_implementation = "sdpa"
    model = transformers.BertModel(config).eval()
    example = batch(2, 16, seed=0)
    analysis = fxprune.analyze(model, example_inputs=example)
    kinds = [g.kind for g in analysis.groups if g.prunable]
    print("prunable groups:", {kind: kinds.count(kind) for kind in ("qk", "v", "heads", "mlp")})
    pruned = fxprune.prune(model, 0.5, example_inputs=example, head_ratio=0.25)
    reference = fxprune.mask(model, fxprune.plan_of(pruned), example_inputs=example)
    params = sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in model.parameters())
    macs = fxprune.count_macs(pruned, example) / fxprune.count_macs(model, example)
    check = fxprune.check_of(pruned)
    print(f"ratio 0.5, heads 0.25 (random init): params {params:.2f} (embeddings included), MACs {macs:.2f}, "
          f"self-check error {check.error:.1e} at batch sizes {check.batch_sizes}")
    for size, length in ((1, 7), (3, 16), (5, 40)):
        ids, mask = batch(size, length, seed=size)
        with torch.no_grad():
            got = pruned(ids, mask).last_hidden_state
            error = fxprune.relative_error(got, reference(ids, mask).last_hidden_state)
        print(f"batch {size}, length {length:2}: output {tuple(got.shape)}, relative error to the masked original {error:.1e}")


if __name__ == "__main__":
    main()
