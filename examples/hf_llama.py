"""A Llama-style decoder from Hugging Face transformers (grouped-query attention, rotary embeddings, gated
MLP): train it briefly on a synthetic next-token task, prune it, and compare next-token loss on held-out
sequences (same tokens for every row); then write one back into ``LlamaForCausalLM`` (``fxprune.to_module``) and
generate with the key/value cache.

    python examples/hf_llama.py            # random init + 200 training steps, then seven pruned variants

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
                                      intermediate_size=256, vocab_size=64, max_position_embeddings=64,
                                      bos_token_id=None, eos_token_id=None)  # every id is a token of the task
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config)
    started = time.perf_counter()
    train(model, args.steps)
    print(f"trained {args.steps} steps in {time.perf_counter() - started:.0f}s (random init, synthetic induction task)")
    held_out = sequences(64, seed=10_000)
    calibration = [sequences(16, seed=20_000 + i) for i in range(4)]
    example = (held_out[:2],)
    params = sum(p.numel() for p in model.parameters())
    print(f"{'setting':44} {'params':>6} {'MACs':>5} {'loss':>6}  (unpruned loss {loss_of(model, held_out):.3f})")
    settings = {  # name -> prune options
        "ratio 0.25, l2": dict(ratio=0.25),
        "ratio 0.5, l2": dict(ratio=0.5),
        "ratio 0.25, heads 0.5, l2": dict(ratio=0.25, head_ratio=0.5),
        "ratio 0.5, taylor": dict(ratio=0.5, importance="taylor", data=calibration),
        "ratio 0.5, l2, compensated": dict(ratio=0.5, reweight_data=calibration),
        # what to_module can write back into LlamaForCausalLM: whole kv groups, MLP channels, whole layers
        "heads + MLP at 0.6 MACs, compensated": dict(target_macs=0.6, kinds=("heads", "mlp"),
                                                     reweight_data=calibration),
        "1 of 2 layers": dict(ratio=0.5, kinds=("layers",)),
    }
    pruned_by_name = {}
    for name, options in settings.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxprune.PruningShortfallWarning)
            pruned = fxprune.prune(model, example_inputs=example, **options)
        pruned_by_name[name] = pruned
        macs = fxprune.count_macs(pruned, example) / fxprune.count_macs(model, example)
        kept = sum(p.numel() for p in pruned.parameters()) / params
        print(f"{name:44} {kept:6.2f} {macs:5.2f} {loss_of(pruned, held_out):6.3f}")

    # back into the model's own class: generate() with the key/value cache
    pruned = pruned_by_name["heads + MLP at 0.6 MACs, compensated"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers of different sizes: the config keeps the original's (said once)
        small = fxprune.to_module(model, pruned, example_inputs=example)
    prompt, target = held_out[:1, :12], held_out[0, 12:32]
    started = time.perf_counter()
    generated = small.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - started
    unpruned = int((model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)[0, 12:] == target).sum())
    sequence = prompt
    with torch.no_grad():
        for _ in range(20):  # the GraphModule has no cache: every step runs the whole sequence
            sequence = torch.cat([sequence, pruned(sequence).logits[:, -1:].argmax(-1)], 1)
    print(f"to_module -> {type(small).__name__} ({sum(p.numel() for p in small.parameters()) / params:.2f} of the "
          f"parameters): generate() with the cache, 20 tokens in {seconds * 1000:.0f} ms, the GraphModule's greedy "
          f"tokens {'equal' if torch.equal(generated, sequence) else 'DIFFER'}; "
          f"{int((generated[0, 12:] == target).sum())} / 20 tokens continue the pattern (unpruned: {unpruned} / 20)")

if __name__ == "__main__":
    main()
