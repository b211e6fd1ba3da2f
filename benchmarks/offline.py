"""Data and models for the accuracy benchmark that need no download.

- ``shapes``: a procedurally generated 10-class image set (five shapes, five textures; random colours,
  position, scale, frequency, phase and noise), drawn fresh from a seed, so training never sees a test image.
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images), upsampled and made RGB.
- ``sentences``: varied English sentences assembled from templates and phrase lists, for text encoders.
- tiny DeiT / Swin / FLatten classifiers for 32x32 shapes, trained from scratch once and cached under
  ``$FXPRUNE_CACHE/benchmarks`` (default ``~/.cache/fxprune/benchmarks``).
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import fxprune.models  # noqa: F401 - registers the FLatten models with timm
from fxprune.zoo import default_cache_dir

SHAPE_CLASSES = ("disk", "square", "triangle", "cross", "ring",
                 "horizontal stripes", "vertical stripes", "checkerboard", "diagonal stripes", "concentric rings")
MEAN, STD = 0.5, 0.25


def shapes(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 3, size, size), normalised, and their labels (balanced, shuffled)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(SHAPE_CLASSES)
    labels = labels[torch.randperm(n, generator=g)]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, 1, 1, generator=g))

    axis = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    cx, cy, scale = uniform(-0.35, 0.35), uniform(-0.35, 0.35), uniform(0.3, 0.6)
    u, v = (xx - cx) / scale, (yy - cy) / scale
    r = torch.sqrt(u * u + v * v)
    frequency, phase = uniform(5.0, 11.0), uniform(0.0, 2 * math.pi)
    masks = torch.stack([
        r < 1.0,
        (u.abs() < 0.8) & (v.abs() < 0.8),
        (v < 0.8) & (u.abs() < (0.8 - v) / 2),
        ((u.abs() < 0.25) & (v.abs() < 0.9)) | ((v.abs() < 0.25) & (u.abs() < 0.9)),
        (r > 0.6) & (r < 1.0),
        torch.sin(yy * frequency + phase) > 0,
        torch.sin(xx * frequency + phase) > 0,
        torch.sin(xx * frequency + phase) * torch.sin(yy * frequency + phase) > 0,
        torch.sin((xx + yy) * frequency * 0.7 + phase) > 0,
        torch.sin(torch.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) * frequency * 1.5 + phase) > 0,
    ], 1)  # (n, classes, size, size)
    mask = masks[torch.arange(n), labels].float().unsqueeze(1)
    foreground = torch.rand(n, 3, 1, 1, generator=g)
    background = torch.rand(n, 3, 1, 1, generator=g)
    close = (foreground - background).abs().sum(1, keepdim=True) < 0.6
    background = torch.where(close, 1 - foreground, background)  # keep the pattern visible
    images = mask * foreground + (1 - mask) * background
    images = images + 0.08 * torch.randn(images.shape, generator=g)
    return ((images - MEAN) / STD).float(), labels


def digits(size: int = 112) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (1797, 3, size, size) images normalised like ImageNet, and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images - mean) / std, torch.tensor(data.target)


TINY_MODELS = {
    # 32x32 shapes, 4x4 patches: 64 tokens + class token; about 30 MMACs per image
    "tiny-deit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3)),
    # two stages of 4x4 windows over a 16x16 then 8x8 map
    "tiny-swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=48,
                                                       depths=(2, 2), num_heads=(3, 6))),
    "tiny-flatten": ("flatten_deit_tiny_patch16_224", dict(img_size=32, patch_size=4, embed_dim=96, depth=4,
                                                          num_heads=3)),
}


def create_tiny(name: str) -> torch.nn.Module:
    timm_name, kwargs = TINY_MODELS[name]
    return timm.create_model(timm_name, num_classes=len(SHAPE_CLASSES), **kwargs)


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            correct += int((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum())
    return correct / len(images)


def train_tiny(name: str, steps: int = 1500, batch: int = 64, lr: float = 2e-3, seed: int = 0,
               cache: Path | None = None, log=print) -> torch.nn.Module:
    """The tiny model trained on fresh shapes every step (cached; a second call loads it)."""
    cache = cache or default_cache_dir() / "benchmarks"
    path = cache / f"{name}-s{steps}-b{batch}-seed{seed}.pt"
    torch.manual_seed(seed)
    model = create_tiny(name)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model.eval()
    started = time.perf_counter()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        images, labels = shapes(batch, seed=10_000 + seed * 1_000_000 + step)
        loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if (step + 1) % 250 == 0:
            log(f"  {name}: step {step + 1}/{steps} loss {float(loss.detach()):.3f} ({time.perf_counter() - started:.0f}s)")
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path.with_suffix(".part"))
    path.with_suffix(".part").replace(path)
    return model.eval()


# Phrase lists for ``sentences``: people and things doing things at times, facts, questions, requests and
# opinions on several topics, so that the sentences' embeddings spread over more than one subject.
_SUBJECTS = ("the old fisherman", "my younger sister", "a group of students", "the new manager", "our neighbour's dog",
             "the chef", "a tired nurse", "the committee", "two children", "the pilot", "an elderly couple",
             "the software team", "a street musician", "the farmer", "my grandfather", "the scientist",
             "a small cat", "the city council", "the teacher", "a young programmer")
_ACTIONS = ("repaired the broken fence", "cooked a spicy curry", "read a long novel about the sea",
            "planted tomatoes in the garden", "missed the last train home", "painted the kitchen blue",
            "wrote a letter to the mayor", "fixed a bug in the payment system", "climbed the steep hill",
            "sold fresh bread at the market", "forgot about the meeting", "adopted a puppy from the shelter",
            "played the violin for an hour", "cleaned every window in the house", "studied the migration of birds",
            "ordered far too much pizza", "lost the car keys again", "won the regional chess tournament",
            "approved the new budget", "built a small wooden boat")
_TIMES = ("yesterday", "on Sunday morning", "after the storm", "before sunrise", "during the holidays",
          "last winter", "in the evening", "while it was raining", "at the old harbour", "near the station")
_REASONS = ("the weather was perfect", "nobody else wanted to", "it was cheaper that way", "the deadline was close",
            "a friend had asked for help", "the instructions were unclear")
_FACTS = ("water boils at one hundred degrees Celsius at sea level", "the moon orbits the earth about once a month",
          "bees are essential for pollinating many crops", "the stock market fell sharply this week",
          "the new phone has a larger battery", "regular exercise lowers the risk of heart disease",
          "the museum is closed on Mondays", "the train to Paris takes about three hours",
          "the recipe needs two eggs and a cup of flour", "the striker scored twice in the final",
          "the password must contain at least twelve characters", "the river floods almost every spring")
_TASKS = ("reset my password", "bake sourdough bread", "get to the airport from here", "learn to play chess",
          "renew my passport", "fix a leaking tap", "train for a marathon", "write a good cover letter",
          "grow basil indoors", "install the printer driver")
_OPINIONS = ("I think", "Most people agree that", "It is surprising that", "The article claims that",
             "My doctor told me that", "Scientists now believe that", "I doubt that", "Everyone knows that")
_TEMPLATES = (
    lambda r: f"{_cap(r.choice(_SUBJECTS))} {r.choice(_ACTIONS)} {r.choice(_TIMES)}.",
    lambda r: f"{_cap(r.choice(_TIMES))}, {r.choice(_SUBJECTS)} {r.choice(_ACTIONS)}.",
    lambda r: f"Nobody expected that {r.choice(_SUBJECTS)} {r.choice(_ACTIONS)}.",
    lambda r: f"{_cap(r.choice(_SUBJECTS))} {r.choice(_ACTIONS)}, but {r.choice(_SUBJECTS)} {r.choice(_ACTIONS)}.",
    lambda r: f"Is it true that {r.choice(_SUBJECTS)} {r.choice(_ACTIONS)} {r.choice(_TIMES)}?",
    lambda r: f"{_cap(r.choice(_SUBJECTS))} {r.choice(_ACTIONS)} because {r.choice(_REASONS)}.",
    lambda r: f"{r.choice(_OPINIONS)} {r.choice(_FACTS)}.",
    lambda r: f"{_cap(r.choice(_FACTS))}.",
    lambda r: f"How do I {r.choice(_TASKS)}?",
    lambda r: f"Can you explain how to {r.choice(_TASKS)} {r.choice(_TIMES)}?",
    lambda r: f"Please remind me to {r.choice(_TASKS)} {r.choice(_TIMES)}.",
)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def sentences(n: int = 300, seed: int = 0) -> list[str]:
    """``n`` distinct English sentences, each from a randomly chosen template filled with random phrases."""
    r = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        out[r.choice(_TEMPLATES)(r)] = None
    return list(out)
