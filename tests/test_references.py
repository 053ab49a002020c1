"""The held-out loss's reference predictors (biomask/training/references.py): the k-mer context model
against a direct count on sequences small enough to check by hand, and what it says on real DNA."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from biomask.store import TokenStore, TokenStoreWriter
from biomask.training.references import FILE, ContextCounts, reference_counts
from biomask.vocab import CLS_ID, NUM_SPECIAL, SEP_ID

BASES = "ACGT"


def _ids(seq: str) -> list[int]:
    return [NUM_SPECIAL + BASES.index(b) for b in seq]


def _store(tmp_path, seqs: list[str]) -> TokenStore:
    writer = TokenStoreWriter(tmp_path / "store", token_fields={"tokens": np.uint16})
    for seq in seqs:
        writer.split("train").add(tokens=np.array(_ids(seq), dtype=np.uint16))
    writer.finish(modality="dna")
    return TokenStore(tmp_path / "store")


def _direct(train: list[str], left: str, centre: str, right: str) -> float:
    """P(centre | the visible neighbours), add-one smoothed, counted by reading every 5-mer of the
    training sequences; "?" is a neighbour the predictor cannot see (masked or beyond the record)."""
    windows = [s[i : i + 5] for s in train for i in range(len(s) - 4)]
    pattern = left + "{}" + right

    def fits(window: str, c: str) -> bool:
        return all(p in ("?", w) for p, w in zip(pattern.format(c), window))

    total = sum(fits(w, c) for w in windows for c in BASES)
    return (sum(fits(w, centre) for w in windows) + 1) / (total + len(BASES))


def test_the_context_model_is_the_smoothed_conditional_count_of_the_visible_neighbours(tmp_path):
    train = ["ACGTACGGTCA", "TTACGTAACG", "GGACGTT"]
    store = _store(tmp_path, train)
    counts = ContextCounts.count(
        store.split("train"), field="tokens", low=NUM_SPECIAL, high=NUM_SPECIAL + 4, k=2
    )
    assert counts.k == 2 and counts.counts.sum() == sum(len(s) - 4 for s in train)

    # one record [CLS] A C G T A [SEP]; masked: the G (both neighbours on each side visible) and the
    # final A (its right side is [SEP] / beyond the record, its left neighbour T masked too)
    seq = "ACGTA"
    ids = torch.tensor([[CLS_ID, *_ids(seq), SEP_ID]])
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[0, 3] = masked[0, 4] = masked[0, 5] = True  # G, T, A
    known = ids >= NUM_SPECIAL
    frequency, context = counts.nll(ids, masked, known)

    expected_context = -(
        math.log(_direct(train, "AC", "G", "??"))  # its right neighbours T and A are masked
        + math.log(_direct(train, "C?", "T", "??"))  # G masked, A masked, [SEP]
        + math.log(_direct(train, "??", "A", "??"))  # T and G masked; [SEP] and beyond
    )
    assert context == pytest.approx(expected_context)
    expected_frequency = -sum(math.log(_direct(train, "??", b, "??")) for b in "GTA")
    assert frequency == pytest.approx(expected_frequency)


def test_on_real_dna_the_context_model_beats_base_frequencies(genome_store):
    """C. elegans chrX: counts from the training split, scored on held-out windows at 15 % masking —
    neighbouring bases carry information, so a model that ends at the frequency loss learned nothing."""
    store = TokenStore(genome_store)
    vocab = store.manifest["tokenizer"]["vocab_size"]
    counts = reference_counts(
        store.split("train"), modality="dna", target="tokens", vocab_size=vocab, n_bins=0
    )
    assert counts is not None and counts.k == 2
    val = store.split("val")
    ids = torch.tensor(np.stack([val[i]["tokens"][:128] for i in range(min(64, len(val)))]).astype(np.int64))
    masked = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.15) & (ids >= NUM_SPECIAL)
    frequency, context = counts.nll(ids, masked, ids >= NUM_SPECIAL)
    n = int(masked.sum())
    assert 1.2 < frequency / n < math.log(5)  # A/C/G/T (+N): a little below uniform over 4 bases
    assert context / n < frequency / n - 0.02


def test_a_pretraining_run_records_its_references_beside_its_held_out_loss(dna_checkpoint):
    run = dna_checkpoint.parent
    final = json.loads((run / "run.json").read_text())["final_eval"]
    tables = json.loads((run / FILE).read_text())
    assert final["reference_tables"]["k"] == tables["k"] == 2
    assert sum(tables["counts"]) > 0 and len(tables["counts"]) == math.prod(tables["shape"])
    refs = final["references"]
    assert set(refs) == {"frequency", "context"}
    for ref in refs.values():
        assert set(ref["loss"]) == set(final["loss"])  # the same ratio grid, the same masked tokens
    assert refs["context"]["mean_loss"] < refs["frequency"]["mean_loss"]
