"""GUARD's classifier (optional, off by default): an MLP on the serving model's
mean-pooled penultimate hidden states, trained per policy on forget vs retain prompts.

As in the paper's description: mean-pool layer l (the penultimate) over non-pad tokens,
an MLP d -> 256 -> 256 -> 2 with ReLU and dropout 0.1, softmax, "forget" when p > 0.5;
trained with Adam, lr 1e-3, 50 epochs, batch 32. It says *whether* a prompt is about the
policy's forget set, not which target: the Detector's hidden-state signal
(``classifiers/signals/hidden_state.py``) attributes a positive to the target the
embedding retriever ranks first for that conversation.

``save(path)`` writes the trained MLP (with the normalisation and the model's path) to one
file; ``HiddenStateClassifier.load(path)`` reads it back, and so does a Detector built with
``DetectorConfig(hidden_state_model=path)`` (how serving turns the signal on).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class HiddenStateClassifier:
    FORMAT = "guardserve-hidden-state-mlp/1"

    def __init__(self, model_path: str | Path, layer: int = -2, device: str = "cpu", max_length: int = 256):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).to(device).eval()
        self.layer, self.device, self.max_length = layer, device, max_length
        self.mlp = None

    def features(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Mean of layer ``layer``'s hidden states over the non-pad tokens of each text."""
        torch = self.torch
        out = []
        with torch.inference_mode():
            for k in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[k:k + batch_size], return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.max_length).to(self.device)
                hs = self.model(**enc, output_hidden_states=True).hidden_states[self.layer]
                mask = enc["attention_mask"].unsqueeze(-1).to(hs.dtype)
                out.append(((hs * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), np.float32)

    def _new_mlp(self, d: int):
        nn = self.torch.nn
        return nn.Sequential(nn.Linear(d, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 256), nn.ReLU(),
                             nn.Dropout(0.1), nn.Linear(256, 2))

    def fit(self, forget: list[str], retain: list[str], epochs: int = 50, lr: float = 1e-3, batch_size: int = 32,
            seed: int = 0) -> dict:
        """Train on forget (label 1) vs retain (label 0) prompts; returns training accuracy."""
        torch = self.torch
        if not forget or not retain:
            raise ValueError("training needs forget and retain prompts")
        x = torch.from_numpy(self.features(forget + retain))
        y = torch.tensor([1] * len(forget) + [0] * len(retain))
        # Balance the classes: retain prompts usually outnumber forget ones many times.
        w = torch.tensor([len(y) / (2 * (y == 0).sum().item()), len(y) / (2 * (y == 1).sum().item())], dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self._mean, self._std = x.mean(0), x.std(0).clamp(min=1e-6)
        xn = (x - self._mean) / self._std
        self.mlp = self._new_mlp(x.shape[1])
        opt = torch.optim.Adam(self.mlp.parameters(), lr=lr)
        loss_fn = torch.nn.CrossEntropyLoss(weight=w)
        self.mlp.train()
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=g)
            for k in range(0, len(y), batch_size):
                idx = perm[k:k + batch_size]
                opt.zero_grad()
                loss_fn(self.mlp(xn[idx]), y[idx]).backward()
                opt.step()
        self.mlp.eval()
        with torch.inference_mode():
            acc = float((self.mlp(xn).argmax(-1) == y).float().mean())
        return {"train_accuracy": round(acc, 4), "n_forget": len(forget), "n_retain": len(retain)}

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """P(forget) for each text."""
        if self.mlp is None:
            raise RuntimeError("the hidden-state classifier is not trained (call fit)")
        torch = self.torch
        x = (torch.from_numpy(self.features(texts)) - self._mean) / self._std
        with torch.inference_mode():
            return torch.softmax(self.mlp(x), -1)[:, 1].numpy()

    def save(self, path: str | Path) -> Path:
        """Write the trained MLP, its input normalisation and the model's path to ``path``
        (one file, tensors and plain values only: ``load`` reads it with ``weights_only``)."""
        if self.mlp is None:
            raise RuntimeError("the hidden-state classifier is not trained (call fit)")
        model_path = Path(self.model_path)
        state = {"format": self.FORMAT, "model_path": str(model_path.resolve()) if model_path.exists() else self.model_path,
                 "layer": self.layer, "max_length": self.max_length, "hidden_size": int(self._mean.shape[0]),
                 "mean": self._mean, "std": self._std, "mlp": self.mlp.state_dict()}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.torch.save(state, path)
        return path

    @classmethod
    def load(cls, path: str | Path, model_path: str | Path | None = None, device: str = "cpu") -> HiddenStateClassifier:
        """A classifier written by ``save``, on the model it was trained on (or ``model_path``:
        the same model elsewhere). Raises if the file is not one, or the model's width differs."""
        import torch

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no hidden-state classifier at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != cls.FORMAT:
            raise ValueError(f"{path} is not a hidden-state classifier saved by HiddenStateClassifier.save")
        clf = cls(model_path or state["model_path"], layer=state["layer"], device=device, max_length=state["max_length"])
        if clf.model.config.hidden_size != state["hidden_size"]:
            raise ValueError(f"{path} was trained on hidden states of width {state['hidden_size']}, "
                             f"the model at {clf.model_path} has {clf.model.config.hidden_size}")
        clf._mean, clf._std = state["mean"], state["std"]
        clf.mlp = clf._new_mlp(state["hidden_size"])
        clf.mlp.load_state_dict(state["mlp"])
        clf.mlp.eval()
        return clf
