"""The tokenizer of an overlapping k-mer export (DNABERT's tokens): raw sequences in, k-mers out.

    tok = AutoTokenizer.from_pretrained("export/", trust_remote_code=True)
    tok(["ACGTACGTA", "acgtn"])        # each sequence read as its k-mers at stride 1

Copied into such an export as `tokenization_biomask.py` (torch-free, biomask-free, like
`modeling_biomask.py`). The export's tokenizer.json is a word-level vocabulary of k-mers split on
whitespace (DNABERT's convention: the caller writes "ACG CGT GTA ..."); no `tokenizers` pre-tokenizer
can emit overlapping pieces, so a raw sequence would read as one unknown word. This class writes the
k-mers itself before the tokenizer reads the text. Text whose words are all k letters long is taken
as k-mers written out, as DNABERT users pass them; other whitespace (a sequence wrapped over lines)
is dropped.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast


def _kmers(text, k: int):
    if isinstance(text, (list, tuple)):
        return type(text)(_kmers(t, k) for t in text)
    if not isinstance(text, str):
        return text
    words = text.split()
    # k-mers written out (DNABERT's form), special tokens such as [MASK] among them
    if len(words) > 1 and all(len(w) == k or (w[:1] == "[" and w[-1:] == "]") for w in words):
        return text
    seq = "".join(words)  # a sequence wrapped over lines (FASTA's 60 or 80 bases a line) is one
    return " ".join(seq[i : i + k] for i in range(len(seq) - k + 1))


class BiomaskKmerTokenizerFast(PreTrainedTokenizerFast):
    """A `PreTrainedTokenizerFast` that reads a raw DNA sequence as its overlapping k-mers."""

    # No __init__ of its own: transformers then loads tokenizer.json as it is (a subclass with one is
    # rebuilt from the vocabulary alone). k comes from tokenizer_config.json (`kmer_k`).
    @property
    def kmer_k(self) -> int:
        return int(self.init_kwargs["kmer_k"])

    def __call__(self, text=None, text_pair=None, *args, **kwargs):
        if kwargs.get("is_split_into_words"):
            return super().__call__(text, text_pair, *args, **kwargs)
        return super().__call__(_kmers(text, self.kmer_k), _kmers(text_pair, self.kmer_k), *args, **kwargs)

    def tokenize(self, text, pair=None, add_special_tokens=False, **kwargs):
        if kwargs.get("is_split_into_words"):
            return super().tokenize(text, pair, add_special_tokens, **kwargs)
        return super().tokenize(
            _kmers(text, self.kmer_k), _kmers(pair, self.kmer_k), add_special_tokens, **kwargs
        )

    def encode(self, text, text_pair=None, *args, **kwargs):
        if kwargs.get("is_split_into_words"):
            return super().encode(text, text_pair, *args, **kwargs)
        return super().encode(_kmers(text, self.kmer_k), _kmers(text_pair, self.kmer_k), *args, **kwargs)
