"""A router learned from labelled examples: a linear classifier over the frozen base model's pooled prompt
embedding, choosing among any number of adapters (or none).

A request's modalities decide the audio projector, as in the reference table; its content decides the adapter
(two speech adapters for two kinds of utterance, task adapters for kinds of question). Routing costs one extra
forward of the prompt through the base model (no adapter, no cache), which the pipeline runs before the request
is queued: `RouteInput.features` is that forward's last hidden states, averaged over the prompt's positions.

    router = LearnedRouter.fit(features, labels)   # features [N, H], labels: adapter names or None
    router.save("router/")                          # router.json + router.safetensors
    LearnedRouter.load("router/")

`phimm train-router --data examples.jsonl --out router/` makes one from examples (`phimm.router_training`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .route import Route, RouteInput, projector_for

CONFIG_FILE, WEIGHTS_FILE = "router.json", "router.safetensors"


class LearnedRouter:
    """`labels[k]` is the adapter (None: the base model alone) of class k; the scores are
    `((features - mean) / std) @ weight.T + bias`."""

    needs_features = True

    def __init__(self, labels: Sequence[str | None], weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                 std: torch.Tensor):
        if weight.shape != (len(labels), mean.shape[0]) or bias.shape != (len(labels),) or std.shape != mean.shape:
            raise ValueError(f"a learned router's tensors do not fit {len(labels)} labels: weight "
                             f"{tuple(weight.shape)}, bias {tuple(bias.shape)}, mean {tuple(mean.shape)}, "
                             f"std {tuple(std.shape)}")
        self.labels = list(labels)
        self.weight, self.bias, self.mean, self.std = weight.float(), bias.float(), mean.float(), std.float()

    @property
    def hidden_size(self) -> int:
        return self.mean.shape[0]

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores `[N, labels]` of pooled embeddings `[N, H]` (or `[H]` -> `[labels]`)."""
        x = (features.float().cpu() - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def predict(self, features: torch.Tensor) -> list[str | None]:
        return [self.labels[int(k)] for k in self.scores(features.reshape(-1, self.hidden_size)).argmax(-1)]

    def __call__(self, inp: RouteInput) -> Route:
        if isinstance(inp.forced, Route):
            return inp.forced
        if inp.forced is not None:
            return Route(adapter=inp.forced, audio_projector=projector_for(inp))
        if inp.features is None:
            raise ValueError("a learned router needs the prompt's pooled embedding (RouteInput.features); "
                             "run it through a phimm pipeline, which computes it")
        return Route(adapter=self.predict(inp.features)[0], audio_projector=projector_for(inp))

    @classmethod
    def fit(cls, features: torch.Tensor, labels: Sequence[str | None], *, steps: int = 500, lr: float = 0.05,
            weight_decay: float = 1e-3, seed: int = 0) -> "LearnedRouter":
        """Softmax regression on standardised features (full batch, Adam), classes in order of first use."""
        classes: list[str | None] = []
        for y in labels:
            if y not in classes:
                classes.append(y)
        x = features.float().cpu()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1])
        x = (x - mean) / std
        y = torch.tensor([classes.index(v) for v in labels])
        g = torch.Generator().manual_seed(seed)
        weight = (torch.randn(len(classes), x.shape[1], generator=g) * 0.01).requires_grad_(True)
        bias = torch.zeros(len(classes), requires_grad=True)
        opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y)
                loss.backward()
                opt.step()
        return cls(classes, weight.detach(), bias.detach(), mean, std)

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps({"kind": "learned", "labels": self.labels,
                                                      "hidden_size": self.hidden_size}, indent=2) + "\n")
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous(), "mean": self.mean.contiguous(),
                   "std": self.std.contiguous()}, str(folder / WEIGHTS_FILE))

    @classmethod
    def load(cls, folder: str | Path) -> "LearnedRouter":
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = json.loads((folder / CONFIG_FILE).read_text())
        if cfg.get("kind") != "learned":
            raise ValueError(f"{folder / CONFIG_FILE}: not a learned router (kind {cfg.get('kind')!r})")
        t = load_file(str(folder / WEIGHTS_FILE))
        return cls(cfg["labels"], t["weight"], t["bias"], t["mean"], t["std"])

    def __repr__(self) -> str:
        return f"LearnedRouter(labels={self.labels}, hidden_size={self.hidden_size})"
