"""biomask in the tools users already have: scanpy-style `biomask.embed` (copy semantics, provenance
per key, a loaded model, backed AnnData, a progress bar), the gene-coverage figure that matters, the
Hugging Face export (Auto* classes, same embeddings as biomask, relocatable, no biomask import in the
remote code), progress lines in logs without a terminal, and `--print-config`."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import yaml

import biomask
from biomask import datasets
from biomask.embedding.inference import embed_records, fit_record
from biomask.models import load_pretrained
from biomask.store import TokenStore
from biomask.training.data import collate

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

# pbmc68k_reduced's .raw holds log1p(counts / n_counts * 1e4)
COUNTS = {"mode": "from_log1p", "total_counts_column": "n_counts"}


@pytest.fixture(scope="module")
def pbmc():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-layout notes
        return anndata.read_h5ad(datasets.fetch("pbmc68k_reduced"))


class Records(logging.Handler):
    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger, self.records = logging.getLogger(name), []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self):
        self.level = self.logger.level
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)
        return self.records

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)


# ------------------------------------------------------------------------------------------- scanpy API


def test_embed_is_in_place_or_a_copy_with_provenance_per_key_and_takes_a_loaded_model(
    pbmc, cells_checkpoint, monkeypatch
):
    adata = pbmc.copy()
    model = load_pretrained(cells_checkpoint)
    copied = biomask.embed(adata, model, matrix="raw", counts=COUNTS, key="X_a", copy=True)
    assert copied is not adata and copied.obsm["X_a"].shape == (700, 32)
    assert "X_a" not in adata.obsm and "X_a" not in adata.uns  # the input is untouched
    # in place: returns None (scanpy's convention); a path and a loaded model give the same vectors
    assert biomask.embed(adata, cells_checkpoint, matrix="raw", counts=COUNTS, key="X_a") is None
    np.testing.assert_allclose(adata.obsm["X_a"], copied.obsm["X_a"], rtol=0, atol=2e-5)
    biomask.embed(adata, model, matrix="raw", counts=COUNTS, key="X_b", pooling="cls")
    # each representation keeps its own record
    assert adata.uns["X_a"]["pooling"] == "mean" and adata.uns["X_a"]["key"] == "X_a"
    assert adata.uns["X_b"]["pooling"] == "cls" and adata.uns["X_b"]["key"] == "X_b"
    assert "biomask" not in adata.uns
    assert adata.uns["X_a"]["checkpoint"] == adata.uns["X_b"]["checkpoint"] == str(cells_checkpoint.resolve())
    # a checkpoint given relative to the working directory is recorded absolute (the record outlives it)
    monkeypatch.chdir(cells_checkpoint.parent)
    biomask.embed(adata, cells_checkpoint.name, matrix="raw", counts=COUNTS, key="X_c")
    assert adata.uns["X_c"]["checkpoint"] == str(cells_checkpoint.resolve())


def test_embed_checks_its_arguments_as_the_command_does(pbmc, cells_checkpoint, monkeypatch):
    """The command line's config bounds these; the Python call did not: batch_size=-1 embedded nothing
    and stored uninitialised memory as the embedding, 0 raised range()'s error, a bad counts policy
    leaked pydantic's."""
    from biomask.errors import InputError

    adata = pbmc.copy()
    for bad, match in (
        ({"batch_size": -1}, "batch_size must be a whole number of at least 1, not -1"),
        ({"chunk_size": 0}, "chunk_size must be a whole number of at least 1, not 0"),
        ({"min_coverage": 2}, "min_coverage is a share of the vocabulary's genes, from 0 to 1"),
        ({"standardise": "cells"}, "standardise must be 'checkpoint' or 'data'"),
        ({"batch_size": True}, "batch_size must be a whole number of at least 1, not True"),
        ({"counts": {"mode": "bogus"}}, r"biomask.embed\(counts=...\): key 'mode'"),
        # scanpy's and scvi-tools' layer= (an AnnData layer) met "'<=' not supported between int and str"
        ({"layer": "counts"}, r"not 'counts': for the AnnData layer 'counts' write matrix='layers/counts'"),
        (
            {"layer": 1.0},
            r"layer is the model's layer whose states are pooled \(an int, -1: the last\), not 1.0$",
        ),
        ({"layer": True}, r"\(an int, -1: the last\), not True$"),  # a bool is an int to Python: layer 1
    ):
        with pytest.raises(InputError, match=match):
            biomask.embed(adata, cells_checkpoint, matrix="raw", **{"counts": COUNTS, **bad})
    with pytest.raises(ValueError, match="pooling must be"):  # scanpy's convention: a ValueError too
        biomask.embed(adata, cells_checkpoint, matrix="raw", counts=COUNTS, pooling="max")
    assert "X_biomask" not in adata.obsm
    biomask.embed(adata, cells_checkpoint, matrix="raw", counts=COUNTS, batch_size=7, chunk_size=50)
    assert np.isfinite(adata.obsm["X_biomask"]).all()
    biomask.embed(adata, cells_checkpoint, matrix="raw", counts=COUNTS, layer=np.int64(-1), key="X_np")
    np.testing.assert_array_equal(adata.obsm["X_np"], adata.obsm["X_biomask"])  # numpy's ints are ints
    # a chunk the embedding loop did not write (a bug of ours) is an error, never rows of stale memory
    from biomask.embedding.cells import CellsEmbedding

    real = CellsEmbedding.run

    def skips_the_first_chunk(self, write, **kwargs):
        return real(self, lambda start, chunk: write(start, chunk) if start else None, **kwargs)

    monkeypatch.setattr(CellsEmbedding, "run", skips_the_first_chunk)
    with pytest.raises(RuntimeError, match="50 of 700 cells were not embedded"):
        biomask.embed(adata, cells_checkpoint, matrix="raw", counts=COUNTS, chunk_size=50, key="X_other")
    assert "X_other" not in adata.obsm


def test_embed_never_replaces_an_obsm_entry_it_did_not_write(pbmc, cells_checkpoint, tmp_path, cli):
    """key=X_pca would silently replace scanpy's PCA (in the AnnData, or in the CLI's output copy); a
    key with '/' would write an .h5ad anndata cannot read back. Both refused; its own key is reused."""
    from biomask.errors import InputError

    adata = pbmc.copy()  # pbmc68k_reduced comes with X_pca and X_umap
    before = adata.obsm["X_pca"].copy()
    with pytest.raises(InputError, match=r"obsm\['X_pca'\] exists and biomask did not write it"):
        biomask.embed(adata, cells_checkpoint, matrix="raw", counts=COUNTS, key="X_pca")
    np.testing.assert_array_equal(adata.obsm["X_pca"], before)
    with pytest.raises(InputError, match="cannot hold '/'"):
        biomask.embed(adata, cells_checkpoint, matrix="raw", counts=COUNTS, key="X_bio/mask")
    for blank in ("", " X_biomask"):  # an empty key wrote an .h5ad that anndata could not read back
        with pytest.raises(InputError, match="without leading or trailing spaces"):
            biomask.embed(adata, cells_checkpoint, matrix="raw", counts=COUNTS, key=blank)
    adata.uns["X_notes"] = {"mine": 1}  # the record would have replaced the user's uns entry
    with pytest.raises(InputError, match=r"uns\['X_notes'\] exists and biomask did not write it"):
        biomask.embed(adata, cells_checkpoint, matrix="raw", counts=COUNTS, key="X_notes")
    assert adata.uns["X_notes"] == {"mine": 1} and "X_notes" not in adata.obsm
    for _ in range(2):  # an embedding of biomask's under the key: replaced
        biomask.embed(adata, cells_checkpoint, matrix="raw", counts=COUNTS, key="X_mine")
    # float16 values (which scipy.sparse refuses) are read as float32: the same embedding
    half = adata.copy()
    half.raw = anndata.AnnData(half.raw.X.toarray().astype(np.float16), var=half.raw.var, obs=half.obs)
    exact = adata.copy()
    exact.raw = anndata.AnnData(half.raw.X.astype(np.float32), var=half.raw.var, obs=half.obs)
    biomask.embed(half, cells_checkpoint, matrix="raw", counts=COUNTS, key="X_half")
    biomask.embed(exact, cells_checkpoint, matrix="raw", counts=COUNTS, key="X_half")
    np.testing.assert_allclose(half.obsm["X_half"], exact.obsm["X_half"], atol=1e-6)
    with pytest.raises(InputError, match="takes an AnnData, not a path"):
        biomask.embed(str(tmp_path / "cells.h5ad"), cells_checkpoint)
    path = tmp_path / "cells.h5ad"
    pbmc.write_h5ad(path)
    base = ("embed", "--checkpoint", cells_checkpoint, "--input", path, "--matrix", "raw",
            "counts.mode=from_log1p", "counts.total_counts_column=n_counts")  # fmt: skip
    for key, said in (("X_pca", "biomask did not write it"), ("X_bio/mask", "key")):
        out = tmp_path / f"out-{key.replace('/', '_')}.h5ad"
        code, _, err = cli(*base, "--output", out, f"key={key}")
        assert code == 2 and said in err and not out.exists(), err
    # the registry's file is in anndata's legacy layout (obsm one compound dataset): the same
    legacy = datasets.fetch("pbmc68k_reduced")
    code, _, err = cli(*base[:4], legacy, *base[5:], "--output", tmp_path / "legacy.h5ad", "key=X_pca")
    assert code == 2 and "obsm['X_pca'] exists" in err and not (tmp_path / "legacy.h5ad").exists(), err


def test_a_backed_anndata_is_streamed_from_its_file(pbmc, cells_checkpoint, tmp_path, capsys):
    path = tmp_path / "current.h5ad"
    pbmc.write_h5ad(path)  # anndata's current layout
    reference = biomask.embed(pbmc, cells_checkpoint, matrix="raw", counts=COUNTS, copy=True)
    backed = anndata.read_h5ad(path, backed="r")
    copied = biomask.embed(backed, cells_checkpoint, matrix="raw", counts=COUNTS, copy=True, chunk_size=128)
    assert not copied.isbacked and "X_biomask" not in backed.obsm
    biomask.embed(backed, cells_checkpoint, matrix="raw", counts=COUNTS, chunk_size=97, progress=True)
    for got in (copied.obsm["X_biomask"], backed.obsm["X_biomask"]):
        np.testing.assert_allclose(got, reference.obsm["X_biomask"], rtol=0, atol=2e-5)
    assert backed.uns["X_biomask"]["input"].startswith("backed AnnData")
    assert (
        "700/700" in capsys.readouterr().err
    )  # the progress bar, when asked (else: on a terminal, long inputs)
    backed.file.close()


def test_coverage_warns_about_missing_vocabulary_genes_not_extra_dataset_genes(pbmc, cells_checkpoint):
    raw = pbmc.raw.to_adata()
    names = list(raw.var_names)
    extra = anndata.AnnData(
        X=sp.hstack([sp.csr_matrix(raw.X), sp.csr_matrix((raw.n_obs, 1000), dtype=np.float32)]).tocsr(),
        obs=pbmc.obs.copy(),
        var=pd.DataFrame(index=names + [f"NOT_IN_VOCAB_{i}" for i in range(1000)]),
    )
    with Records("biomask.cells.encode") as records:
        out = biomask.embed(extra, cells_checkpoint, counts=COUNTS, copy=True)
    coverage = out.uns["X_biomask"]["gene_coverage"]
    assert coverage["fraction_of_vocab_present"] == pytest.approx(1.0)
    assert coverage["fraction_of_dataset_genes"] == pytest.approx(len(names) / (len(names) + 1000))
    assert not [r for r in records if r.levelno >= logging.WARNING]  # every vocabulary gene is there
    assert any("765 of the checkpoint's 765 vocabulary genes" in r.getMessage() for r in records)
    # a third of the vocabulary measured: that is worth a warning
    few = raw[:, : len(names) // 3].copy()
    few.obs = pbmc.obs.copy()
    with Records("biomask.cells.encode") as records:
        biomask.embed(few, cells_checkpoint, counts=COUNTS)
    warned = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "255 of the checkpoint's 765 vocabulary genes (33.3%)" in warned[0]
    assert "100.0% of its 255 genes are in the vocabulary" in warned[0]


# ------------------------------------------------------------------------------------------- Hugging Face


def _real_dna(checkpoint, store, n=12, length=100):
    """Real chrX sequences (decoded from the store) and their biomask records."""
    from biomask.dna.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(checkpoint / "tokenizer")
    split = TokenStore(store).split("val")
    records = [{"tokens": np.asarray(split[i]["tokens"])[:length]} for i in range(n)]
    return [tokenizer.decode(r["tokens"]) for r in records], records


def test_hf_export_of_a_dna_model_loads_with_auto_classes_and_embeds_identically(
    dna_checkpoint, genome_store, tmp_path, cli
):
    from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerFast

    code, out, err = cli("export-hf", "--checkpoint", dna_checkpoint, "--output", tmp_path / "first")
    assert code == 0, err
    folder = shutil.move(out.strip(), tmp_path / "moved")  # relocatable: nothing points back
    assert not (tmp_path / "first").exists()
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert config.model_type == "biomask" and config.hidden_size == 32
    import torch

    import biomask
    from biomask.provenance import code_version

    exporter = json.loads((tmp_path / "moved" / "config.json").read_text())["biomask"]["exported_by"]
    assert exporter["biomask"] == biomask.__version__ and exporter["torch"] == torch.__version__
    assert exporter["source_sha256"] == code_version()["source_sha256"]  # which remote code this is
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    plain = PreTrainedTokenizerFast.from_pretrained(folder)  # tokenizer.json: no code needed (README)
    assert (
        tok.model_max_length
        == 130
        == json.loads((tmp_path / "moved" / "config.json").read_text())["model_max_length"]
    )
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    biomask_model = load_pretrained(dna_checkpoint)

    sequences, records = _real_dna(dna_checkpoint, genome_store)
    batch = tok(sequences, padding=True, return_tensors="pt")
    assert batch["attention_mask"].dtype == torch.int64  # HF's integer mask
    expected = collate(records, modality="dna")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert plain(sequences[0])["input_ids"] == batch["input_ids"][0][: len(records[0]["tokens"]) + 2].tolist()
    # the normaliser: lowercase is uppercased, IUPAC ambiguity letters are N
    assert tok(sequences[0].lower())["input_ids"] == tok(sequences[0])["input_ids"]
    assert tok("ACGTRYKMn")["input_ids"] == tok("ACGTNNNNN")["input_ids"]
    assert tok.unk_token_id not in tok("acgtrysw")["input_ids"]
    assert len(tok("A" * 500, truncation=True)["input_ids"]) == 130

    ours = embed_records(biomask_model, records, pooling="mean", batch_size=5)
    with torch.no_grad():
        output = model(**batch, output_hidden_states=True)
    assert float(np.abs(output.pooler_output.numpy() - ours).max()) < 1e-5
    varied = [seq[: 40 + 5 * i] for i, seq in enumerate(sequences)]  # records of several lengths
    with torch.no_grad():
        right = model(**tok(varied, padding=True, return_tensors="pt")).pooler_output
        tok.padding_side = "left"  # positions count the kept tokens: left padding embeds the same
        padded = tok(varied, padding=True, return_tensors="pt")
        assert not bool(padded["attention_mask"][0, 0])
        left = model(**padded).pooler_output
        tok.padding_side = "right"
    assert float((left - right).abs().max()) < 1e-5
    assert len(output.hidden_states) == 3 and output.last_hidden_state.shape[:2] == batch["input_ids"].shape
    for layer in (0, 1):
        theirs = model.embed(**batch, pooling="cls", layer=layer).numpy()
        ours = embed_records(biomask_model, records, pooling="cls", layer=layer)
        assert float(np.abs(theirs - ours).max()) < 1e-5
    with pytest.raises(
        ValueError, match=r"layer 7 does not exist: the model has 2 blocks, so layer is -3\.\.2"
    ):
        model.embed(**batch, layer=7)
    # an export whose weights were edited is refused by the loader, not loaded silently
    from safetensors.torch import load_file, save_file

    edited = shutil.copytree(folder, tmp_path / "edited")
    weights = load_file(edited / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1.0
    save_file(weights, edited / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.safetensors is not the file biomask exported"):
        AutoModel.from_pretrained(edited, trust_remote_code=True)
    model.save_pretrained(tmp_path / "saved")  # saved again by transformers: no digest, loads as before
    assert AutoModel.from_pretrained(tmp_path / "saved", trust_remote_code=True).config.hidden_size == 32


HF_CELLS = """
import sys, json
sys.modules["biomask"] = None  # the export must load without biomask
import numpy as np, torch
from transformers import AutoModel, AutoTokenizer
folder, batch_file, out_file = sys.argv[1:]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
batch = {k: torch.from_numpy(v) for k, v in np.load(batch_file).items()}
genes = tok.convert_ids_to_tokens(batch["input_ids"][0][1:4].tolist())
ids = tok(" ".join(genes))["input_ids"]
np.save(out_file, model(**batch).pooler_output.detach().numpy())
print(json.dumps({"ids": ids, "max": tok.model_max_length, "kind": model.config.kind}))
"""


def test_hf_export_of_a_cells_model_needs_no_biomask_and_embeds_identically(
    cells_checkpoint, pbmc_store, tmp_path
):
    from biomask.export import export_hf

    before = os.umask(0o022)
    try:
        folder = export_hf(cells_checkpoint, tmp_path / "cells-hf")
    finally:
        os.umask(before)
    # a colleague sharing the folder can read the weights (safetensors alone writes them 0600)
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()}[
        "model.safetensors"
    ] == 0o644
    assert {"config.json", "model.safetensors", "modeling_biomask.py", "tokenizer.json",
            "tokenizer_config.json", "genes.tsv"} <= {p.name for p in folder.iterdir()}  # fmt: skip
    assert "biomask" not in re.findall(
        r"^\s*(?:from|import) (\w+)", (folder / "modeling_biomask.py").read_text(), re.M
    )
    # its card: no pipeline tag (a cell model needs `values` no pipeline passes), the values' formula
    # with the checkpoint's own target_sum
    card = (folder / "README.md").read_text()
    target_sum = json.loads((cells_checkpoint / "config.json").read_text())["prep"]["normalise"]["target_sum"]
    assert "pipeline_tag" not in card and f"count × {target_sum:,.0f})" in card, card
    records = [TokenStore(pbmc_store).split("train")[i] for i in range(40)]
    # cut as biomask cuts a binned cell to the model's input: its 128 highest-valued genes
    records = [
        fit_record({k: np.asarray(r[k]) for k in ("tokens", "values", "bins")}, 128, order_free=True)
        for r in records
    ]
    batch = collate(records, modality="cells")
    arrays = {k: v.numpy() for k, v in batch.items()}
    arrays["attention_mask"] = arrays["attention_mask"].astype(np.int64)
    np.savez(tmp_path / "batch.npz", **arrays)
    script = tmp_path / "load.py"
    script.write_text(HF_CELLS)
    done = subprocess.run(
        [sys.executable, script, folder, tmp_path / "batch.npz", tmp_path / "theirs.npy"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["max"] == 129 and facts["kind"] == "transformer"
    assert facts["ids"] == [1, *batch["input_ids"][0][1:4].tolist()]  # [CLS] and the genes, no [SEP]
    ours = embed_records(load_pretrained(cells_checkpoint), records, pooling="mean", max_length=129)
    assert float(np.abs(np.load(tmp_path / "theirs.npy") - ours).max()) < 1e-5


def _profile_checkpoint(pbmc_store, tmp_path, n: int, **arch_keys) -> tuple[list[dict], Path]:
    """A small profile autoencoder (random weights, the store's gene statistics) saved as a portable
    checkpoint, and the `n` training records it was standardised on."""
    from biomask.models import EncoderConfig, ProfileAutoencoder, save_pretrained
    from biomask.models.profile import gene_statistics

    store = TokenStore(pbmc_store)
    records = [{k: np.asarray(store.split("train")[i][k]) for k in ("tokens", "values")} for i in range(n)]
    arch = EncoderConfig(
        vocab_size=store.manifest["tokenizer"]["vocab_size"], modality="cells", kind="mlp", d_model=16,
        n_layers=2, n_heads=1, d_ff=32, positions=False, scheme="binned", target="values", **arch_keys,
    )  # fmt: skip
    torch.manual_seed(0)
    profile = ProfileAutoencoder(arch)
    profile.set_gene_stats(*gene_statistics(records, arch.vocab_size, panel=False))
    checkpoint = save_pretrained(
        profile.state_dict(), arch, tmp_path / "profile", tokenizer_dir=pbmc_store / "tokenizer",
        info={"modality": "cells", "scheme": "binned", "training": {"max_length": 766}},
    )  # fmt: skip
    return records, checkpoint


@pytest.mark.parametrize(("ratio_input", "embed_norm"), [(False, "none"), (True, "l2")])
def test_hf_export_of_a_profile_autoencoder(pbmc_store, tmp_path, ratio_input, embed_norm):
    from transformers import AutoModel

    from biomask.export import export_hf

    records, checkpoint = _profile_checkpoint(
        pbmc_store, tmp_path, 50, ratio_input=ratio_input, embed_norm=embed_norm
    )
    folder = export_hf(checkpoint, tmp_path / "profile-hf")
    # the scheme's own class says whether a gene a record leaves out was unmeasured (the exported
    # code cannot ask biomask's registry; it used to compare the scheme's name with "panel")
    assert json.loads((folder / "config.json").read_text())["complete_profile"] is False  # binned
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    batch = collate(records, modality="cells")
    ours = embed_records(load_pretrained(checkpoint), records)
    with torch.no_grad():
        output = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"].long(),
            values=batch["values"],
        )
    assert output.last_hidden_state.shape == (50, 1, 16)
    assert float(np.abs(output.pooler_output.numpy() - ours).max()) < 1e-5
    lengths = np.linalg.norm(ours, axis=1)
    assert np.allclose(lengths, 1.0, atol=1e-5) == (embed_norm == "l2")
    # a few linear layers and no attention: transformers' switches are refused, not ignored
    with pytest.raises(ValueError, match="has no attention layers"):
        model(input_ids=batch["input_ids"], values=batch["values"], output_attentions=True)
    with pytest.raises(ValueError, match="does not support activation checkpointing"):
        model.activation_checkpointing_enable()


def test_hf_export_reads_raw_sequences_as_overlapping_kmers_and_trains_a_classifier(tmp_path):
    """DNABERT-style tokens: the export's tokenizer writes a raw sequence's k-mers itself (a plain
    tokenizer.json would read the whole sequence as one [UNK]); the classifier class loads the encoder."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from biomask.dna.tokenizers import OverlappingKmerTokenizer
    from biomask.export import export_hf
    from biomask.models import EncoderConfig, build_model, save_pretrained

    tokenizer = OverlappingKmerTokenizer(k=3)
    tokenizer.save(tmp_path / "tok")
    arch = EncoderConfig(
        vocab_size=tokenizer.vocab_size,
        modality="dna",
        d_model=16,
        n_layers=2,
        n_heads=2,
        d_ff=32,
        max_len=66,
    )
    torch.manual_seed(0)
    model = build_model(arch)
    checkpoint = save_pretrained(
        model.state_dict(), arch, tmp_path / "kmer3", tokenizer_dir=tmp_path / "tok",
        info={"modality": "dna", "training": {"max_length": 66}},
    )  # fmt: skip
    folder = export_hf(checkpoint, tmp_path / "hf")
    assert (folder / "tokenization_biomask.py").is_file()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    sequences = ["ACGTACGTAG", "ttgcaNACGG"]
    ids = tok(sequences, padding=True, return_tensors="pt")
    records = [{"tokens": tokenizer.encode(seq.upper())} for seq in sequences]
    assert torch.equal(ids["input_ids"], collate(records, modality="dna")["input_ids"])
    assert tok("ACG CGT GTA")["input_ids"] == tok("ACGTA")["input_ids"]  # DNABERT's written-out form too
    # a sequence wrapped over lines (FASTA) or split by a space is one sequence, not k-mers written out
    assert tok("ACGT\nACG")["input_ids"] == tok("ACGTACG")["input_ids"]
    assert tok("ACGTAC GTAC")["input_ids"] == tok("ACGTACGTAC")["input_ids"]
    assert tok.tokenize("ACGTA") == ["ACG", "CGT", "GTA"]  # every entry point reads the k-mers
    assert tok.mask_token_id in tok("ACG [MASK] GTA")["input_ids"]  # written out with a special token
    assert tok.unk_token_id not in tok("acgta")["input_ids"]
    hf = AutoModel.from_pretrained(folder, trust_remote_code=True)
    ours = embed_records(load_pretrained(checkpoint), records, pooling="mean")
    assert float(np.abs(hf.embed(**ids).numpy() - ours).max()) < 1e-5
    with pytest.raises(ValueError, match=r"record\(s\) \[0\] have no tokens"):
        hf(
            **tok(["A", "ACGTA"], padding=True, return_tensors="pt")
        )  # shorter than one k-mer: nothing to pool

    # a classifier on the pooled vector: the encoder's weights load, the head learns
    clf = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, num_labels=2)
    assert torch.equal(clf.biomask.embedder.tokens.weight, hf.embedder.tokens.weight)
    rng = np.random.default_rng(0)
    sequences = ["".join(rng.choice(list("ACGT"), 20)) for _ in range(32)]
    labels = torch.tensor([int(seq.count("G") > 5) for seq in sequences])
    batch = tok(sequences, padding=True, return_tensors="pt")
    optimizer = torch.optim.Adam(clf.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = clf(**batch, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert out.logits.shape == (32, 2) and losses[-1] < losses[0] * 0.8
    # saved by transformers, the folder no longer claims to be biomask's export as written
    clf.save_pretrained(tmp_path / "tuned")
    saved = json.loads((tmp_path / "tuned" / "config.json").read_text())["biomask"]
    assert saved["format"] == "saved-from-biomask-hf-export" and "weights_sha256" not in saved
    assert json.loads((folder / "config.json").read_text())["biomask"]["format"] == "biomask-hf-export"


def _tiny_dna_export(tmp_path: Path, kind: str = "transformer") -> Path:
    """A small untrained DNA model of `kind` (3-mer tokens) exported for transformers."""
    from biomask.dna.tokenizers import OverlappingKmerTokenizer
    from biomask.export import export_hf
    from biomask.models import EncoderConfig, build_model, save_pretrained

    tokenizer = OverlappingKmerTokenizer(k=3)
    tokenizer.save(tmp_path / "tok")
    arch = EncoderConfig(
        vocab_size=tokenizer.vocab_size, modality="dna", kind=kind, d_model=16, n_layers=2,
        n_heads=2 if kind == "transformer" else 1, d_ff=32, max_len=66,
    )  # fmt: skip
    torch.manual_seed(0)
    checkpoint = save_pretrained(
        build_model(arch).state_dict(), arch, tmp_path / kind, tokenizer_dir=tmp_path / "tok",
        info={"modality": "dna", "training": {"max_length": 66}},
    )  # fmt: skip
    return export_hf(checkpoint, tmp_path / f"{kind}-hf")


def test_hf_export_returns_attention_weights_and_fine_tunes_with_gradient_checkpointing(tmp_path):
    """transformers' standard switches, as a fine-tuning user sets them: `output_attentions=True`
    (on the call or the config) returns each block's weights instead of being ignored, and
    gradient_checkpointing_enable() (Trainer's gradient_checkpointing=True) recomputes the blocks in
    the backward pass (fewer activations kept, the same gradients) instead of being refused."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    folder = _tiny_dna_export(tmp_path)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    batch = tok(["ACGTACGTAG", "ttgcaNACGGACGTACGT"], padding=True, return_tensors="pt")
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        plain = model(**batch)
        out = model(**batch, output_attentions=True)
    assert plain.attentions is None
    length = batch["input_ids"].shape[1]
    assert [a.shape for a in out.attentions] == [(2, 2, length, length)] * 2
    short = int(batch["attention_mask"][0].sum())  # the first record is padded after `short` tokens
    for weights in out.attentions:
        assert torch.allclose(weights.sum(-1), torch.ones(2, 2, length), atol=1e-5)
        assert bool((weights[0, :, :, short:] == 0).all())  # no query attends to padding
    assert torch.allclose(out.last_hidden_state, plain.last_hidden_state, atol=1e-5)
    assert len(model(**batch, output_attentions=True, return_dict=False)) == 3
    configured = AutoModel.from_pretrained(folder, trust_remote_code=True, output_attentions=True)
    assert len(configured(**batch).attentions) == 2
    # attn_implementation as DNABERT-2 and NT users pass it: SDPA (what runs) is said so, not refused;
    # "eager" runs the attention written out
    sdpa = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation="sdpa")
    assert model.config._attn_implementation == sdpa.config._attn_implementation == "sdpa"
    eager = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
    calls = []
    sdpa_called = mock.patch.object(
        torch.nn.functional, "scaled_dot_product_attention", side_effect=calls.append
    )
    with sdpa_called, torch.no_grad():
        written_out = eager(**batch).last_hidden_state
    assert calls == [] and torch.allclose(written_out, plain.last_hidden_state, atol=1e-5)

    def step(model) -> tuple[dict[str, torch.Tensor], int]:
        """One training step's gradients, and how many tensors autograd kept for the backward."""
        kept = []
        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(1) or t, lambda t: t):
            loss = model(**batch).last_hidden_state.pow(2).mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(kept)

    model.train()
    grads, kept = step(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed, kept_checkpointed = step(model)
    assert kept_checkpointed < kept / 2
    for name, grad in grads.items():
        assert torch.allclose(checkpointed[name], grad, atol=1e-6), name
    # the classifier as transformers' Trainer drives it with gradient_checkpointing=True
    clf = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, num_labels=2)
    clf.activation_checkpointing_enable()  # transformers 5's name for it
    clf.train()
    out = clf(**batch, labels=torch.tensor([0, 1]), output_attentions=True)
    out.loss.backward()
    assert len(out.attentions) == 2 and clf.classifier.weight.grad is not None

    cnn = AutoModel.from_pretrained(_tiny_dna_export(tmp_path, "cnn"), trust_remote_code=True)
    with pytest.raises(ValueError, match=r"kind 'cnn'\) has no attention layers"):
        cnn(**batch, output_attentions=True)
    cnn.gradient_checkpointing_enable()
    cnn.train()
    assert (
        step(cnn)[1] < step(AutoModel.from_pretrained(tmp_path / "cnn-hf", trust_remote_code=True).train())[1]
    )


def test_hf_export_of_a_profile_model_in_half_precision_and_with_genes_outside_its_panel(
    pbmc_store, tmp_path
):
    from transformers import AutoConfig, AutoModel

    from biomask.export import export_hf

    records, checkpoint = _profile_checkpoint(pbmc_store, tmp_path, 8)
    folder = export_hf(checkpoint, tmp_path / "hf")
    batch = collate(records, modality="cells")
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "values": batch["values"],
    }
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        full = model(**inputs).pooler_output
    for dtype in (torch.float16, torch.bfloat16):
        half = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype)
        with torch.no_grad():
            out = half(**{**inputs, "values": inputs["values"].to(dtype)}).pooler_output
        assert out.dtype == dtype and float((out.float() - full).abs().max()) < 0.1
    # a gene outside the panel ([UNK]) changes nothing, as in biomask.embed
    ids, values = inputs["input_ids"].clone(), inputs["values"].clone()
    pad = ~inputs["attention_mask"][0]
    assert bool(pad.any())
    slot = int(pad.nonzero()[0])
    ids[0, slot], values[0, slot] = 4, 5.0  # [UNK] with a value
    mask = inputs["attention_mask"].clone()
    mask[0, slot] = True
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, values=values).pooler_output
    assert float((out - full).abs().max()) == 0.0
    # values shifted by one (the [CLS] slot forgotten) pair every gene with another's value: refused
    shifted = torch.zeros_like(values)
    shifted[:, :-1] = inputs["values"][:, 1:]
    with pytest.raises(ValueError, match=r"non-zero value at a \[CLS\] or \[SEP\] position"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], values=shifted)
    # gene names it does not know (another case, Ensembl IDs, another species) are [UNK]: every cell
    # would get the same vector, so refused; a record naming few panel genes is warned about
    unknown = torch.where(inputs["input_ids"] >= 5, 4, inputs["input_ids"])
    with pytest.raises(ValueError, match=r"record\(s\) \[0, 1, 2, 3, 4\] name no gene of the model's panel"):
        model(input_ids=unknown, attention_mask=inputs["attention_mask"], values=inputs["values"])
    # a record of no genes at all (a cell expressing none of the panel) is a cell, embedded as biomask does
    empty_ids, empty_mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    empty_ids[0], empty_mask[0] = 0, False
    empty_ids[0, :2], empty_mask[0, :2] = torch.tensor([1, 2]), True
    empty_values = torch.where(empty_mask, inputs["values"], 0.0)
    empty_values[0] = 0.0
    with torch.no_grad():
        assert (
            model(input_ids=empty_ids, attention_mask=empty_mask, values=empty_values).pooler_output.shape[0]
            == 8
        )
    few = inputs["input_ids"].clone()
    few[0, 2:] = torch.where(few[0, 2:] >= 5, 4, few[0, 2:])
    model.config.complete_profile = True  # as a panel model's export says (this one is binned)
    with pytest.warns(
        UserWarning,
        match=r"8 record\(s\) name under 50% of the model's 765 panel genes \(record 0: 1, \d+ \[UNK\]\)",
    ):
        model(input_ids=few, attention_mask=inputs["attention_mask"], values=inputs["values"])
    model.config.complete_profile = False
    # raw counts where log-normalised values belong: said
    counts = torch.where(inputs["values"] > 0, 7.0, 0.0)
    counts[:, 1] = 120.0
    with pytest.warns(UserWarning, match=r"8 record\(s\) hold only whole numbers.*raw counts, it seems"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], values=counts)
    # the bound is the checkpoint's own: values of a store normalised to a million reach 13.8
    import warnings

    for scheme in ("rank", "my_scheme"):  # values that are not log1p: whole numbers are no sign of counts
        model.config.scheme = scheme
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], values=counts)
    model.config.scheme = "binned"

    model.config.biomask = {"source_checkpoint": {"prep": {"normalise": {"target_sum": 1e6}}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            values=torch.where(counts > 100, 12.0, counts),
        )
    ids[0, slot] = ids[0, 1]  # a gene listed twice: refused, not silently one of its two values
    with pytest.raises(ValueError, match=r"record\(s\) \[0\] list a gene more than once"):
        model(input_ids=ids, attention_mask=mask, values=values)
    # transformers' config switches are honoured
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True, output_hidden_states=True)
    with torch.no_grad():
        assert (
            len(
                AutoModel.from_pretrained(folder, config=config, trust_remote_code=True)(
                    **inputs
                ).hidden_states
            )
            == 3
        )


# ------------------------------------------------------------------------------------------- logs, CLI


def test_training_progress_is_a_timestamped_line_per_logged_step_without_a_terminal(tmp_path):
    from biomask.training.metrics import MetricsLogger

    stream = io.StringIO()  # not a terminal, like an sbatch log
    metrics = MetricsLogger(
        tmp_path, total_steps=100, start_step=0, enabled=True, progress=True, stream=stream
    )
    assert metrics.bar is None
    values = {"loss": 2.5, "ratio": 0.3, "tokens_per_s": 12345.6, "accuracy": 0.25, "lr": 1e-3}
    for step in (10, 20):
        metrics.advance(10)
        metrics.log(step, "train", values)
    metrics.log(20, "eval", {"loss": {"0.15": 2.0}, "mean_loss": 2.1})
    metrics.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    # local time with its UTC offset (a bare local time ran backwards at a daylight-saving change)
    pattern = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d{4}\] pretrain step 10/100 \(10\.0%\) loss 2\.5000 acc 0\.250 tok/s 12,346 ETA \d+:\d\d:\d\d"
    assert re.match(pattern, lines[0]), lines[0]
    assert "step 20/100" in lines[1] and "held-out loss 2.1000" in lines[2]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    (tmp_path / "t").mkdir()
    bar = MetricsLogger(
        tmp_path / "t", total_steps=100, start_step=0, enabled=True, progress=True, stream=terminal
    )
    bar.log(10, "train", values)
    bar.close()
    assert bar.bar is not None and "pretrain step" not in terminal.getvalue()


@pytest.mark.parametrize(
    "stage, key",
    [
        (["prep", "dna"], "windows"),
        (["prep", "cells"], "counts"),
        (["pretrain"], "train"),
        (["evaluate"], "seeds"),
        (["embed"], "pooling"),
        (["report"], "title"),
        (["theory"], "gammas"),
    ],
)
def test_print_config_shows_each_stage_resolved_defaults(stage, key, cli):
    code, out, err = cli(*stage, "--print-config")
    assert code == 0, err
    assert key in yaml.safe_load(out)


def test_print_config_applies_the_config_file_and_overrides(cli, repo):
    code, out, _ = cli(
        "pretrain", "-c", repo / "configs/pretrain/dna-tiny.yaml", "--print-config", "train.steps=7"
    )
    assert code == 0 and yaml.safe_load(out)["train"]["steps"] == 7
    code, out, _ = cli("pretrain", "--print-config")
    data = yaml.safe_load(out)
    assert data["train"]["log_every"] == 10 and data["output"] is None and "required" in out
    code, out, _ = cli("pretrain", "--print-config", "train.steps=7")  # valid, with required keys unset
    assert code == 0 and yaml.safe_load(out)["train"]["steps"] == 7
    assert "(required): data.store, output\n" in out
    code, out, _ = cli("pretrain", "--print-config", "data.store=s")  # one given: the other is left to set
    assert code == 0 and "(required): output\n" in out and yaml.safe_load(out)["data"]["store"] == "s"
    # an override the stage would refuse is refused here too (printed as valid, exit 0, before)
    for stage, wrong, said in (
        (["pretrain"], "train.step=5", "did you mean 'steps'"),
        (["pretrain"], "train.steps=ten", "train.steps"),
        (["theory"], "test_repetition=3", "did you mean 'test_repetitions'"),
    ):
        code, out, err = cli(*stage, "--print-config", wrong)
        assert code == 2 and said in err and not out, (wrong, err)
    with pytest.raises(SystemExit) as stopped:
        cli("pretrain")
    assert stopped.value.code == 2
    # optional arguments are not called required
    with pytest.raises(SystemExit):
        cli("pipeline", "run")
    code, _, err = cli("datasets", "fetch")
    assert code == 2 and "name a dataset to fetch" in err


def test_a_newcomers_slips_at_the_command_line_are_named_with_the_nearest_choice(capsys):
    """A misspelled command, option or subcommand, and an override written as a flag: the root usage
    and "unrecognized arguments" named neither the command nor what was meant."""
    from biomask.cli import main

    for argv, said in (
        (["pretrian"], "unknown command 'pretrian': did you mean `biomask pretrain`?"),
        (["prep", "dan"], "did you mean `biomask prep dna`?"),
        (["embed", "--chekpoint", "x"], "biomask embed: error: unrecognized arguments: --chekpoint; --chekpoint: did you mean --checkpoint?"),
        (["pretrain", "-c", "x.yaml", "--train.steps=5"], "overrides are written without dashes (train.steps=5)"),
        (["prep", "dna"], "biomask prep dna: error: the following arguments are required: -c/--config"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as done:
            main(argv)
        err = capsys.readouterr().err
        assert done.value.code == 2 and said in err, (argv, err)


def test_a_config_of_another_command_is_named_as_such(cli, repo, tmp_path):
    """An evaluate YAML given to pretrain listed a dozen unknown keys (and a pipeline file given to
    report suggested 'targets' for 'stages'): one line names the command the file is for."""
    code, _, err = cli("pretrain", "-c", repo / "configs/evaluate/splice.yaml")
    assert code == 2 and "is a `biomask evaluate` config, not a `biomask pretrain` one" in err, err
    assert "unknown key" not in err
    code, _, err = cli("report", "-c", repo / "configs/pipelines/study-quick.yaml")
    assert code == 2 and "is a pipeline file: run it with `biomask pipeline run" in err, err
    code, _, err = cli("pipeline", "run", repo / "configs/pretrain/dna-tiny.yaml", "--dry-run")
    assert code == 2 and "is a `biomask pretrain` config, not a pipeline file" in err, err
    code, _, err = cli("pretrain", "-c", repo / "configs/pretrain/dna-tiny.yaml", "train.step=3")
    assert code == 2 and "did you mean 'steps'" in err  # a slip in the right command's config: as before
    # one key this command lacks is a slip, not another command's file (prep cells' keys nearly all
    # are prep dna's): its own error, not "run prep dna"
    slip = tmp_path / "cells.yaml"
    slip.write_text("inputs: [{dataset: pbmc68k_reduced}]\noutput: o\nnum_workers: 4\n")
    code, _, err = cli("prep", "cells", "-c", slip)
    assert code == 2 and "unknown key 'num_workers'" in err and "prep dna" not in err, err
    code, _, err = cli("fit-cells", "--input", slip, "--output", tmp_path / "f", "train.steps")
    assert code == 2 and "is not of the form key.sub=value" in err


def test_the_command_line_bounds_onednns_kernel_cache_unless_the_user_set_it(monkeypatch, capsys):
    """oneDNN kept a kernel (and its memory) per input shape, 1,024 by default: `biomask embed` on
    50,000 DNA records of many lengths peaked at 1.0 GB, 0.72 GB with 64 (and ran faster; measured,
    docs/benchmarks.md). Set before any kernel is built; a user's own value wins."""
    from biomask import datasets
    from biomask.cli import main

    seen = []  # the value while the command runs (the caller's comes back after it)
    registry = datasets.registry
    monkeypatch.setattr(
        datasets,
        "registry",
        lambda: seen.append(os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY")) or registry(),
    )
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert main(["-q", "datasets", "list"]) == 0
    assert seen == ["64"] and "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    assert main(["-q", "datasets", "list"]) == 0
    assert seen == ["64", "512"] and os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"


def test_version_names_the_code_run_folders_record(capsys):
    """`--version` said 0.1.0 for every commit: it names the commit and the source's sha256, as
    run.json's `code` records them."""
    from biomask.cli import main
    from biomask.provenance import code_version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    code = code_version()
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith("biomask ") and code["source_sha256"][:12] in out
    assert code["git_commit"] is None or code["git_commit"][:12] in out


def test_loading_a_model_leaves_the_callers_random_stream_alone(cells_checkpoint):
    """Building the model before its weights load drew from torch's global RNG: a notebook's
    `torch.manual_seed(0)` followed by biomask.embed gave another stream than without the call."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_pretrained(cells_checkpoint)
    assert torch.equal(torch.rand(3), expected)


def test_the_model_card_names_the_strongest_reference_and_where_the_model_loses_to_it():
    from biomask.export.hf import _held_out_lines

    info = {
        "eval": {
            "loss": {"0.1": 1.20, "0.5": 0.90},
            "mean_loss": 1.05,
            "references": {
                "frequency": {"loss": {"0.1": 1.30, "0.5": 1.30}, "mean_loss": 1.30},
                "context": {"loss": {"0.1": 1.10, "0.5": 1.00}, "mean_loss": 1.05},
            },
        }
    }
    line = _held_out_lines(info)
    assert "against 1.050 for the strongest reference predictor, context" in line
    assert "0.1: 1.200 (1.100)" in line and line.endswith("Worse than the reference at ratio 0.1")
    assert _held_out_lines({}) == "- Held-out masked loss: not recorded"


def test_a_cell_model_card_describes_the_records_its_scheme_wrote():
    """A binned model's card said "zeros included" and a rank model's that its values were log1p:
    a user building inputs by hand from the card would feed either model records it never saw."""
    from types import SimpleNamespace

    from biomask.export.hf import model_card

    def card(scheme: str, kind: str, value_embedding: str, n_bins: int = 0) -> str:
        model = SimpleNamespace(
            checkpoint_info={"scheme": scheme, "prep": {"normalise": {"target_sum": 1e4}}},
            config=SimpleNamespace(
                modality="cells",
                kind=kind,
                n_layers=2,
                d_model=32,
                value_embedding=value_embedding,
                n_bins=n_bins,
            ),
        )
        text = model_card(
            model, Path("ckpt"), {"biomask": {"exported_from": "ckpt"}, "model_max_length": 130}
        )
        return text.split("## Inputs", 1)[1]

    panel = card("panel", "mlp", "none")
    assert "every panel gene the data measures, zeros included" in panel
    assert "each log1p(count / the cell's total count × 10,000)" in panel and "raw counts" in panel
    binned = card("binned", "transformer", "bins", n_bins=51)
    assert "zeros included" not in binned and "the genes the cell expresses (non-zero counts)" in binned
    assert "more than 128, its highest-valued" in binned and "1..51" in binned
    rank = card("rank", "transformer", "none")
    assert "log1p" not in rank and "raw counts" not in rank and "zeros included" not in rank
    assert "highest value first" in rank and "the model reads none" in rank
    assert "up to 128" in rank  # the model's 130 tokens less [CLS] and [SEP]
    # a rank model given values through an MLP reads them, and they are still no log1p
    valued = card("rank", "transformer", "mlp")
    assert "Values: token-aligned" in valued and "raw counts" not in valued and "log1p" not in valued
    assert "corpus non-zero median of the gene" in rank
