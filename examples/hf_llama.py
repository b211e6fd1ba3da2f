"""A Llama-style decoder from Hugging Face transformers (grouped-query attention, rotary embeddings, gated
MLP): train it briefly on a synthetic next-token task, prune it, and compare next-token loss on held-out
sequences (same tokens for every row).

    python examples/hf_llama.py            # random init + 200 training steps, then four pruned variants

Model hubs are unreachable here, so the model is built from a config and trained on a task it can learn in
seconds: each sequence repeats a random 8-token pattern, so from the second repetition on every token is
predictable from context (an induction task that needs attention).
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

import fxprune


def sequences(count: int, seed: int, vocab: int = 64, pattern: int = 8, repeats: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, pattern), generator=generator).repeat(1, repeats)


def loss_of(model, tokens: torch.Tensor) -> float:
    """Next-token cross-entropy over the predictable part (after the first repetition)."""
    with torch.no_grad():
        logits = model(tokens).logits
    return float(F.cross_entropy(logits[:, 8:-1].reshape(-1, logits.shape[-1]), tokens[:, 9:].reshape(-1)))


def train(model, steps: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        tokens = sequences(16, seed=step)
        logits = model(tokens).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def main() -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                                      intermediate_size=256, vocab_size=64, max_position_embeddings=64)
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config)
    started = time.perf_counter()
    train(model, args.steps)
    print(f"trained {args.steps} steps in {time.perf_counter() - started:.0f}s (random init, synthetic induction task)")
    held_out = sequences(64, seed=10_000)
    calibration = [sequences(16, seed=20_000 + i) for i in range(4)]
    example = (held_out[:2],)
    params = sum(p.numel() for p in model.parameters())
    print(f"{'setting':34} {'params':>8} {'MACs':>6} {'loss':>6}  (unpruned loss {loss_of(model, held_out):.3f})")
    for ratio, head_ratio, criterion in ((0.25, 0.0, "l2"), (0.5, 0.0, "l2"), (0.25, 0.5, "l2"), (0.5, 0.0, "taylor")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxprune.PruningShortfallWarning)
            pruned = fxprune.prune(model, ratio, example_inputs=example, head_ratio=head_ratio, importance=criterion,
                                   data=calibration if criterion == "taylor" else None)
        macs = fxprune.count_macs(pruned, example) / fxprune.count_macs(model, example)
        kept = sum(p.numel() for p in pruned.parameters()) / params
        name = f"ratio {ratio}, heads {head_ratio}, {criterion}"
        print(f"{name:34} {kept:8.2f} {macs:6.2f} {loss_of(pruned, held_out):6.3f}")


if __name__ == "__main__":
    main()
