"""Train the cross-encoder reranker on CPU (sentence-transformers' CrossEncoderTrainer) and ship its weights."""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rag_persona.utils.io import atomic_folder, check_replaceable


@dataclass
class RerankerRecipe:
    """What one reranker run trains on and how; the defaults are the shipped CPU run."""

    jaquad_questions: int = 3000
    jsts_pairs: int = 1500
    personas: int = 0  # the first N synthetic personas (0: all)
    persona_negatives: int = 4
    negatives: int = 3
    paragraph_share: float = 0.15
    train_layers: int = 6  # the top N of e5's 12 layers (and the head) train; embeddings and the rest stay
    max_length: int = 160
    batch_size: int = 16
    learning_rate: float = 5e-5
    epochs: float = 1.0
    max_steps: int = 800  # about 0.6 epoch of the ~21.7k pairs: ~1 h on one CPU core
    seed: int = 0
    threads: int = 2
    extra: dict = field(default_factory=dict)


def build_pairs(recipe: RerankerRecipe, ranker=None) -> list:
    """All training pairs, shuffled: JaQuAD sentences and paragraphs, JSTS, synthetic personas' train queries."""
    from .data import jaquad_pairs, jsts_pairs, persona_pairs, synthetic_personas

    rng = random.Random(recipe.seed)
    pairs = jaquad_pairs(rng, recipe.jaquad_questions, recipe.negatives, recipe.paragraph_share)
    pairs += jsts_pairs(rng, recipe.jsts_pairs)
    folders = synthetic_personas()[: recipe.personas or None]
    pairs += persona_pairs(folders, "train", rng, recipe.persona_negatives, ranker)
    rng.shuffle(pairs)
    return pairs


def hybrid_ranker(depth: int = 12):
    """Candidates as the shipped retriever ranks them (hybrid, no threshold): the negatives the reranker
    must learn to push down are the ones it will be shown."""
    from rag_persona.retrieval.retriever import RetrievalConfig, Retriever
    from rag_persona.retrieval.store import build_store

    def rank(folder: Path, queries) -> list[list[str]]:
        store = build_store(folder / "facts.jsonl")
        r = Retriever(store, RetrievalConfig(mode="hybrid", threshold=0.0, k=depth))
        return [[fid for fid, _ in row] for row in r.rankings([q.query for q in queries], depth=depth)]

    return rank


def sequence_classifier(model, tokenizer, folder: Path):
    """The e5 encoder under an XLM-RoBERTa sequence-classification head (1 logit), saved as a local HF
    folder that sentence-transformers' CrossEncoder loads."""
    from rag_persona.retrieval.reranker import e5_classifier

    clf = e5_classifier(model)
    clf.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def train_reranker(recipe: RerankerRecipe, out: Path, log=print) -> dict:
    """Train and write `out` atomically: reranker.safetensors (trained layers + head), reranker.json."""
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    from rag_persona.retrieval.e5_torch import load_e5_model
    from rag_persona.retrieval.reranker import MANIFEST, save_trained

    # Refused before an hour of training: --out replaces only an earlier reranker folder (or none).
    check_replaceable(Path(out).absolute(), MANIFEST, "a reranker")
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    started = time.perf_counter()
    pairs = build_pairs(recipe, hybrid_ranker())
    log(f"[rerank] {len(pairs)} pairs built in {time.perf_counter() - started:.0f} s")
    base, tokenizer = load_e5_model()
    with atomic_folder(out, marker=MANIFEST, what="a reranker") as tmp:
        hf = sequence_classifier(base, tokenizer, Path(tmp) / "hf-init")
        model = CrossEncoder(str(hf), num_labels=1, max_length=recipe.max_length, device="cpu")
        first_trained = base.config.num_hidden_layers - recipe.train_layers
        for name, p in model.model.named_parameters():
            layer = name.split("encoder.layer.")[1].split(".")[0] if "encoder.layer." in name else None
            p.requires_grad = name.startswith("classifier") or (
                layer is not None and int(layer) >= first_trained
            )
        trainable = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
        log(f"[rerank] trainable parameters {trainable:,} (top {recipe.train_layers} layers + head)")
        from rag_persona.retrieval.reranker import format_pair

        rows = [dict(zip(("query", "passage"), format_pair(p.query, p.passage), strict=True)) for p in pairs]
        data = Dataset.from_list([{**row, "label": p.label} for row, p in zip(rows, pairs, strict=True)])
        args = CrossEncoderTrainingArguments(
            output_dir=str(Path(tmp) / "checkpoints"),
            per_device_train_batch_size=recipe.batch_size,
            learning_rate=recipe.learning_rate,
            num_train_epochs=recipe.epochs,
            max_steps=recipe.max_steps,
            warmup_ratio=0.05,
            lr_scheduler_type="linear",
            logging_steps=20,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=recipe.seed,
            dataloader_num_workers=0,
        )
        trainer = CrossEncoderTrainer(
            model=model, args=args, train_dataset=data, loss=BinaryCrossEntropyLoss(model)
        )
        result = trainer.train()
        info = {
            "recipe": asdict(recipe),
            "pairs": len(pairs),
            "pair_sources": dict(Counter(p.source for p in pairs)),
            "train_loss": round(float(result.training_loss), 5),
            "steps": int(result.global_step),
            "wall_minutes": round((time.perf_counter() - started) / 60, 1),
            "data": [
                "JaQuAD train (Skelter Labs, CC BY-SA 3.0) via ../shared/datasets/jaquad",
                "JSTS train (JGLUE, Yahoo Japan, CC BY-SA 4.0) via ../shared/datasets/jsts",
                "knowledge/_synthetic/*/queries/train.jsonl (this repository)",
            ],
        }
        save_trained(model.model, first_trained, Path(tmp), info)
        shutil.rmtree(Path(tmp) / "hf-init")
        shutil.rmtree(Path(tmp) / "checkpoints", ignore_errors=True)
    log(json.dumps({k: v for k, v in info.items() if k != "recipe"}, ensure_ascii=False))
    return info
