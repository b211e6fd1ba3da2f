"""Decoding speed of a pruned Hugging Face causal LM: the GraphModule against ``fxprune.to_module``'s copy.

A Llama-style decoder (random init, built from a config: 8 layers, hidden 512, 8 query heads over 4 kv heads of
64, MLP 1408, vocabulary 8000) generates greedily at batch 1 and 8 from a prompt of 64 tokens. Rows:
the original with its key/value cache (``generate``), the pruned GraphModule (no cache: each step recomputes the
whole sequence, the only way it can decode), and ``to_module(model, pruned)`` with the cache (``generate``).
Plans: half of the kv groups and half of each MLP (``head_ratio=0.5``, ``kinds=("mlp",)``), the same with half
of the residual width, and half of the decoder layers (``kinds=("layers",)``). Time per generated token is the
median of interleaved rounds; the pruned rows also give the ratio to the original's. Tokens are checked equal
between the GraphModule and the copy.

    python benchmarks/decode.py                    # table + results/decode.json
    python benchmarks/decode.py --new-tokens 32 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

import fxprune

RESULTS = Path(__file__).parent / "results"
CONFIG = dict(vocab_size=8000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
              head_dim=64, intermediate_size=1408, max_position_embeddings=512, attn_implementation="sdpa",
              bos_token_id=None, eos_token_id=None, pad_token_id=0)
PLANS = {"heads 0.5 + MLP 0.5": dict(head_ratio=0.5, kinds=("mlp",)),
         "heads 0.5 + MLP 0.5 + residual 0.5": dict(head_ratio=0.5, kinds=("mlp", "residual")),
         "layers 0.5": dict(kinds=("layers",))}


def greedy_without_cache(pruned: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    sequence = prompt
    for _ in range(new_tokens):
        logits = pruned(sequence).logits[:, -1]
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], 1)
    return sequence


def generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    example = (torch.randint(3, CONFIG["vocab_size"], (1, 16)),)
    variants = {"original": ("generate, cache", model, generate)}
    facts: dict[str, dict] = {"original": {"params": fxprune.count_params(model), "macs": fxprune.count_macs(model, example)}}
    for label, options in PLANS.items():
        pruned = fxprune.prune(model, 0.5, example_inputs=example, **options)
        small = fxprune.to_module(model, pruned, example_inputs=example)
        variants[f"{label}: GraphModule"] = ("recompute, no cache", pruned, greedy_without_cache)
        variants[f"{label}: to_module"] = ("generate, cache", small, generate)
        facts[label] = {"params": fxprune.count_params(small), "macs": fxprune.count_macs(small, example)}
    rows = []
    print(f"prompt {args.prompt} tokens, {args.new_tokens} generated, {args.threads} threads, median of {args.rounds}")
    print("| batch | model | decoding | params kept | MACs kept (16 tokens) | ms / token | vs original |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        prompt = torch.randint(3, CONFIG["vocab_size"], (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        times: dict[str, list[float]] = {key: [] for key in variants}
        outputs: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for key, (_, module, run) in variants.items():  # warm-up
                outputs[key] = run(module, prompt, 2)
            for _ in range(args.rounds):
                for key, (_, module, run) in variants.items():
                    started = time.perf_counter()
                    outputs[key] = run(module, prompt, args.new_tokens)
                    times[key].append((time.perf_counter() - started) / args.new_tokens)
        base = statistics.median(times["original"])
        for key, (how, _, _) in variants.items():
            plan = key.split(": ")[0]
            fact = facts["original" if key == "original" else plan]
            ms = statistics.median(times[key]) * 1e3
            if key.endswith("to_module"):
                assert torch.equal(outputs[key], outputs[key.replace("to_module", "GraphModule")]), key
            row = {"batch": batch, "model": key, "decoding": how, "ms_per_token": round(ms, 2),
                   "vs_original": round(ms / (base * 1e3), 3),
                   "params_kept": round(fact["params"] / facts["original"]["params"], 3),
                   "macs_kept": round(fact["macs"] / facts["original"]["macs"], 3)}
            rows.append(row)
            print(f"| {batch} | {key} | {how} | {row['params_kept']:.3f} | {row['macs_kept']:.3f} | {ms:.1f} | "
                  f"{row['vs_original']:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode.json").write_text(json.dumps({"config": CONFIG, "args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
