"""Cleaning DNA by explicit policies, vectorised over whole records with byte lookup tables.

- `lowercase`: soft-masked (lowercase) bases are ordinary bases (`upper`) or ambiguous (`ambiguous`).
- `ambiguous`: what N and IUPAC codes (R Y S W K M B D H V) become: an N token (`n_token`), a reason
  to drop the window or sequence (`drop`), a place to split a genome record (`split`), or an error.
- Any other letter (digits, gaps, U, ...) is outside every policy: an error naming file, record and position.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from biomask.errors import InputError

IUPAC_AMBIGUOUS = "NRYSWKMBDHV"
_COMPLEMENT = np.arange(256, dtype=np.uint8)
for _a, _b in zip(b"ACGTN", b"TGCAN"):
    _COMPLEMENT[_a] = _b


def reverse_complement(windows: np.ndarray) -> np.ndarray:
    """Reverse complement of ASCII A/C/G/T/N arrays along the last axis."""
    return _COMPLEMENT[windows[..., ::-1]]


class Cleaner:
    """Maps raw letters to A/C/G/T/N and marks the ambiguous ones, following the configured policy."""

    def __init__(
        self,
        lowercase: Literal["upper", "ambiguous"] = "upper",
        ambiguous: Literal["n_token", "drop", "split", "error"] = "n_token",
    ) -> None:
        self.ambiguous_policy = ambiguous
        self.to_char = np.zeros(256, dtype=np.uint8)  # 0 marks a letter outside every policy
        self.is_ambiguous = np.zeros(256, dtype=bool)
        for base in "ACGT":
            self.to_char[ord(base)] = ord(base)
            self.to_char[ord(base.lower())] = ord(base)
            self.is_ambiguous[ord(base.lower())] = lowercase == "ambiguous"
        for code in IUPAC_AMBIGUOUS:
            for letter in (code, code.lower()):
                self.to_char[ord(letter)] = ord("N")
                self.is_ambiguous[ord(letter)] = True
        # With lowercase treated as ambiguous, a soft-masked base is kept as N.
        if lowercase == "ambiguous":
            for base in "acgt":
                self.to_char[ord(base)] = ord("N")

    def clean(self, seq: str | bytes, where: str, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(ASCII A/C/G/T/N array, ambiguous mask) of a sequence; `where` names it in error messages
        and `offset` is the sequence's position in its record (for the reported position)."""
        data = seq if isinstance(seq, bytes) else seq.encode("latin-1", errors="replace")
        raw = np.frombuffer(data, dtype=np.uint8)
        chars = self.to_char[raw]
        bad = chars == 0
        if bad.any():
            pos = int(np.argmax(bad))
            raise InputError(
                f"{where}: letter {chr(raw[pos])!r} at position {offset + pos + 1:,} is not a nucleotide "
                f"(allowed: ACGT, lowercase, N and IUPAC codes {IUPAC_AMBIGUOUS[1:]})"
            )
        amb = self.is_ambiguous[raw]
        if self.ambiguous_policy == "error" and amb.any():
            pos = int(np.argmax(amb))
            raise InputError(
                f"{where}: ambiguous letter {chr(raw[pos])!r} at position {offset + pos + 1:,}, and cleaning.ambiguous "
                "is 'error'; choose n_token, drop or split to accept ambiguous bases"
            )
        return chars, amb
