"""DNA tokenizers: round trips, k-mer edge cases, agreement with their HF tokenizer.json, reload."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from biomask.dna.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    KmerTokenizer,
    OverlappingKmerTokenizer,
    load_tokenizer,
)
from biomask.vocab import CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS, UNK_ID

RNG = np.random.default_rng(7)


def random_dna(length: int, n_fraction: float = 0.0) -> str:
    seq = RNG.choice(list("ACGT"), length)
    seq[RNG.random(length) < n_fraction] = "N"
    return "".join(seq)


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    corpus = [random_dna(300, 0.01) for _ in range(300)] + ["ACGTTGCA" * 40] * 50
    return BPETokenizer.train(corpus, vocab_size=200)


def all_tokenizers(bpe):
    return [
        CharTokenizer(),
        KmerTokenizer(6),
        KmerTokenizer(3),
        KmerTokenizer(1),
        OverlappingKmerTokenizer(4),
        bpe,
    ]


def test_special_tokens_have_fixed_ids(bpe):
    assert (PAD_ID, CLS_ID, SEP_ID, MASK_ID, UNK_ID) == (0, 1, 2, 3, 4)
    for tok in all_tokenizers(bpe):
        for index, token in enumerate(SPECIAL_TOKENS):
            assert tok.hf.token_to_id(token) == index, (tok.kind, token)


@pytest.mark.parametrize("n_fraction", [0.0, 0.05, 0.5])
def test_round_trip_is_exact_for_acgtn(bpe, n_fraction):
    for tok in all_tokenizers(bpe):
        if tok.kind == "overlapping_kmer":
            continue  # checked separately: bases covered only by N-containing k-mers come back as N
        for length in (0, 1, 5, 6, 7, 59, 60, 257):
            seq = random_dna(length, n_fraction)
            assert tok.decode(tok.encode(seq)) == seq, (tok.kind, seq)


def test_overlapping_round_trip_up_to_its_n_policy():
    tok = OverlappingKmerTokenizer(3)
    seq = random_dna(200)
    assert tok.decode(tok.encode(seq)) == seq
    # A base between two Ns is covered only by k-mers holding N: it comes back as N, the rest intact.
    ids = tok.encode("ACGTNANCCGT")
    assert ids.size == 11 - 3 + 1
    assert tok.decode(ids) == "ACGTNNNCCGT"


@pytest.mark.parametrize("n_fraction", [0.0, 0.1])
def test_fast_path_matches_hf_tokenizer_json(bpe, n_fraction):
    """The vectorised encoders give exactly the ids the saved tokenizer.json gives through HF."""
    for tok in all_tokenizers(bpe):
        seqs = [
            random_dna(length, n_fraction) for length in (0, 1, 2, 5, 6, 7, 13, 64, 200) for _ in range(5)
        ]
        seqs.append("ACGTXACGT")  # a letter outside the vocabulary is [UNK]
        for seq, ids in zip(seqs, tok.encode_batch(seqs).to_list()):
            expected = tok.hf.encode(tok.hf_text(seq), add_special_tokens=False).ids
            assert ids.tolist() == expected, (tok.kind, seq)
            framed = tok.hf.encode(tok.hf_text(seq)).ids
            assert framed[0] == CLS_ID and framed[-1] == SEP_ID


def test_kmer_edge_cases():
    tok = KmerTokenizer(3)
    kmer = tok.hf.token_to_id
    # shorter than k: single bases
    assert tok.encode("AC").tolist() == [kmer("A"), kmer("C")]
    # length not a multiple of k: k-mers, then the leftover bases one by one
    assert tok.encode("ACGTA").tolist() == [kmer("ACG"), kmer("T"), kmer("A")]
    # N splits runs: each run is read from its own start
    assert tok.encode("ACGNTTGCA").tolist() == [kmer("ACG"), kmer("N"), kmer("TTG"), kmer("C"), kmer("A")]
    # N at both ends and in a run
    assert tok.encode("NNACGTN").tolist() == [kmer("N"), kmer("N"), kmer("ACG"), kmer("T"), kmer("N")]
    assert tok.encode("NNNN").tolist() == [kmer("N")] * 4
    assert tok.encode("").tolist() == []
    # every 3-mer id is distinct and decodes to itself
    assert len({kmer(a + b + c) for a in "ACGT" for b in "ACGT" for c in "ACGT"}) == 64


def test_batched_windows_equal_one_by_one(bpe):
    """Window batches (the genome fast path) restart k-mer frames at each window boundary."""
    for tok in all_tokenizers(bpe):
        windows = [random_dna(50, 0.08) for _ in range(30)]
        block = np.frombuffer("".join(windows).encode(), dtype=np.uint8).reshape(30, 50)
        batched = tok.encode_windows(block).to_list()
        for seq, ids in zip(windows, batched):
            assert ids.tolist() == tok.encode(seq).tolist(), tok.kind


def test_save_and_reload(tmp_path, bpe):
    for tok in all_tokenizers(bpe):
        directory = tmp_path / f"{tok.kind}-{getattr(tok, 'k', 0)}"
        tok.save(directory)
        again = load_tokenizer(directory)
        assert type(again) is type(tok)
        assert again.vocab_size == tok.vocab_size
        seq = random_dna(97, 0.05)
        assert again.encode(seq).tolist() == tok.encode(seq).tolist()
        # plain HF tokenizers can read the file too
        hf = Tokenizer.from_file(str(directory / "tokenizer.json"))
        assert hf.encode(tok.hf_text(seq), add_special_tokens=False).ids == tok.encode(seq).tolist()


def test_bpe_learns_multi_base_tokens(bpe):
    ids = bpe.encode("ACGTTGCA" * 10)
    assert ids.size < 80 / 2  # a repeated motif compresses to tokens of several bases
    assert bpe.vocab_size <= 200
