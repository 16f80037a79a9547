"""A tiny attention classifier on token ids: "does token A come before token B?"

Every sequence has length 12 over a vocabulary of 10 ids: exactly one A (id 1), exactly one B (id 2), and
fillers (ids 3..9). Label 1 ("A first") iff the position of A is smaller than that of B. Only those two
positions decide the answer.

Model: token embedding (the ONNX tensor ``embeddings``, [batch, 12, 32]) + learned positional embedding ->
2 pre-LayerNorm single-head attention blocks (attention + ReLU MLP, residual) -> mean over positions ->
Linear(32, 2) logits. The input is integer ids, so derivatives go through ``embeddings``.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import torch

from ._common import (accuracy, export_onnx, onnx_io, ort_run, param_count, r4, rename_tensor, rng, seed_everything,
                      write_card)

SEQ_LEN, VOCAB, DIM = 12, 10, 32
TOKEN_A, TOKEN_B = 1, 2
CLASSES = ["B first", "A first"]
WRT_TENSOR = "embeddings"
N_TRAIN, N_HELDOUT = 6000, 1000


def make_sequences(n: int, seed: int, split: str) -> dict[str, np.ndarray]:
    """tokens (n, 12) int64, labels (n,) int64, pos_a, pos_b (n,) int64; deterministic in seed/split."""
    g = rng(seed, f"sequence/{split}")
    tokens = g.integers(3, VOCAB, size=(n, SEQ_LEN))
    pos = np.argsort(g.uniform(size=(n, SEQ_LEN)), axis=1)[:, :2]
    pa, pb = pos[:, 0], pos[:, 1]
    rows = np.arange(n)
    tokens[rows, pa] = TOKEN_A
    tokens[rows, pb] = TOKEN_B
    return {"tokens": tokens.astype(np.int64), "labels": (pa < pb).astype(np.int64), "pos_a": pa.astype(np.int64),
            "pos_b": pb.astype(np.int64)}


class Block(torch.nn.Module):
    def __init__(self, dim: int = DIM, hidden: int = 64):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.ln2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, dim))
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        att = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * self.scale, dim=-1)
        h = h + self.proj(torch.matmul(att, v))
        return h + self.mlp(self.ln2(h))


class SequenceClassifier(torch.nn.Module):
    def __init__(self, n_layers: int = 2):
        super().__init__()
        self.tok = torch.nn.Embedding(VOCAB, DIM)
        self.pos = torch.nn.Parameter(torch.randn(1, SEQ_LEN, DIM) * 0.5)
        self.blocks = torch.nn.ModuleList([Block() for _ in range(n_layers)])
        self.ln = torch.nn.LayerNorm(DIM)
        self.head = torch.nn.Linear(DIM, len(CLASSES))

    def from_embeddings(self, e: torch.Tensor) -> torch.Tensor:
        h = e + self.pos
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln(h).mean(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.from_embeddings(self.tok(tokens))


def position_map(model: SequenceClassifier, tokens: np.ndarray) -> np.ndarray:
    """(n, classes, positions): the norm over the embedding dim of d logit[c] / d embeddings[pos]."""
    with torch.no_grad():
        e = model.tok(torch.from_numpy(tokens))
    J = torch.func.vmap(torch.func.jacrev(lambda x: model.from_embeddings(x[None])[0]))(e)  # (n, C, L, D)
    return J.norm(dim=-1).numpy()


def top2_hits(maps: np.ndarray, pos_a: np.ndarray, pos_b: np.ndarray) -> float:
    """Fraction of rows whose two largest positions (summed over classes) are exactly {pos_a, pos_b}."""
    s = maps.sum(1)
    top = np.argsort(-s, axis=1)[:, :2]
    return float(np.mean([set(t) == {a, b} for t, a, b in zip(top, pos_a, pos_b)]))


def build_sequence(out_dir: str, seed: int = 0, log=print) -> dict[str, Any]:
    t0 = time.time()
    d = os.path.join(out_dir, "sequence")
    os.makedirs(d, exist_ok=True)
    seed_everything(seed)
    tr = make_sequences(N_TRAIN, seed, "train")
    ho = make_sequences(N_HELDOUT, seed, "heldout")
    torch.manual_seed(seed)
    model = SequenceClassifier()
    epochs, batch = 30, 128
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    steps = epochs * ((N_TRAIN + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(tr["tokens"]), torch.from_numpy(tr["labels"])
    for ep in range(epochs):
        perm = torch.randperm(N_TRAIN, generator=g)
        for i in range(0, N_TRAIN, batch):
            idx = perm[i:i + batch]
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        train_acc = accuracy(model(xt).numpy(), tr["labels"])
        ho_acc = accuracy(model(torch.from_numpy(ho["tokens"])).numpy(), ho["labels"])
    maps = position_map(model, ho["tokens"][:200])
    hits = top2_hits(maps, ho["pos_a"][:200], ho["pos_b"][:200])
    s = maps.sum(1)
    share = float(np.median((s[np.arange(200), ho["pos_a"][:200]] + s[np.arange(200), ho["pos_b"][:200]])
                            / s.sum(1)))
    log(f"  sequence: train acc {train_acc:.4f}, held-out acc {ho_acc:.4f}; top-2 positions = A,B in "
        f"{hits:.3f}; median share of A+B {share:.3f}")

    path = os.path.join(d, "sequence.onnx")
    ex = export_onnx(model, (torch.from_numpy(ho["tokens"][:2]),), path, dynamo=False, input_names=["tokens"],
                     output_names=["logits"])
    _name_embedding_output(path)
    ort_acc = accuracy(ort_run(path, {"tokens": ho["tokens"]})[0], ho["labels"])
    card = {
        "name": "sequence",
        "description": "Tiny 2-layer attention classifier: is token A (id 1) before token B (id 2)?",
        "files": {"onnx": "sequence.onnx"},
        "format": ["onnx"],
        "exporter": {"sequence.onnx": ex["exporter"]},
        "opset": ex["opset"],
        **onnx_io(path),
        "output_kind": "logits",
        "wrt_tensor": WRT_TENSOR,
        "wrt_tensor_shape": ["batch", SEQ_LEN, DIM],
        "wrt_tensor_note": "the output of the token-embedding Gather, before the positional embedding is added; "
                           "the input ids are integers, so derivatives are taken with respect to this tensor",
        "preprocessing": {"layout": f"[batch, {SEQ_LEN}] int64 token ids", "scale": None},
        "vocabulary": {"0": "unused", "1": "A", "2": "B", "3-9": "fillers"},
        "classes": CLASSES,
        "parameters": param_count(model),
        "architecture": f"Embedding({VOCAB},{DIM}) + learned positions -> 2 x [LayerNorm, single-head attention, "
                        "residual, LayerNorm, MLP 32-64-32, residual] -> LayerNorm -> mean over positions -> "
                        "Linear(32,2)",
        "data": {"generator": "jacaudit.samples.sequence.make_sequences", "train": {"n": N_TRAIN, "split": "train"},
                 "heldout": {"n": N_HELDOUT, "split": "heldout"},
                 "rule": "one A and one B at distinct random positions, fillers 3..9 elsewhere; label 1 iff "
                         "pos(A) < pos(B)"},
        "train_accuracy": r4(train_acc),
        "heldout_accuracy": r4(ho_acc),
        "heldout_accuracy_onnxruntime": r4(ort_acc),
        "seed": seed,
        "truth": "The class x input-position Jacobian map (norm over the embedding dim of d logit / d embeddings) "
                 "is largest at the positions of A and B, the only ones that decide the answer.",
        "position_map_check": {
            "method": "norm over the embedding dim of d logit[c] / d embeddings[pos], summed over classes",
            "heldout_first_n": 200,
            "top2_positions_are_A_and_B": r4(hits),
            "median_share_of_A_and_B": r4(share),
        },
    }
    write_card(os.path.join(d, "sequence.json"), card)
    log(f"  sequence: done in {time.time() - t0:.1f}s")
    return card


def _name_embedding_output(path: str) -> None:
    """Give the token-embedding Gather's output the stable name :data:`WRT_TENSOR`."""
    import onnx

    proto = onnx.load(path)
    inits = {t.name for t in proto.graph.initializer}
    gathers = [n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in inits
               and n.input[1] == "tokens"]
    if len(gathers) != 1:
        raise RuntimeError(f"expected one embedding Gather on 'tokens', found {len(gathers)}")
    rename_tensor(proto, gathers[0].output[0], WRT_TENSOR)
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
