"""`biomask export-hf`: a portable checkpoint as a Hugging Face folder.

    biomask export-hf --checkpoint runs/pretrain/dna-tiny/model --output exports/dna-tiny

    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained("exports/dna-tiny", trust_remote_code=True)
    model = AutoModel.from_pretrained("exports/dna-tiny", trust_remote_code=True)

The folder (relocatable: nothing in it names a path that loading needs):

- `config.json`: `model_type: "biomask"`, `auto_map` to the remote code, the architecture, `pooling`,
  `model_max_length`, and under `biomask` the source checkpoint's own config.json (provenance: its
  hashes, training, masking, data; the paths there are where it was trained, read by nothing);
- `modeling_biomask.py`: the encoder in plain torch + transformers (biomask/export/hf_modeling.py,
  copied; it does not import biomask);
- `model.safetensors`: the encoder's weights, unchanged (the pretraining head and MAE decoder are left
  out);
- `tokenizer.json`, `tokenizer_config.json` (`model_max_length` = the length the model was trained on,
  specials included), `special_tokens_map.json`; DNA tokenizers get a normaliser (lowercase →
  uppercase, or N where the corpus treated soft-masked bases as ambiguous; IUPAC ambiguity letters →
  N; whitespace dropped, so a pasted multi-line sequence reads whole), as `biomask embed` cleans
  sequences. Overlapping k-mers (DNABERT's tokens) also get `tokenization_biomask.py`, a tokenizer
  class that writes a raw sequence's k-mers itself (no `tokenizers` pre-tokenizer emits overlapping
  pieces). Cells: `genes.tsv` (gene ids and corpus medians) too;
- `README.md`, a model card, when the folder has none (one you wrote is kept).

`config.json` records the sha256 of every file the export wrote: a rerun reuses only an export whose
files are all as written, and `--overwrite` refuses to replace files changed since (fine-tuned weights
saved into the folder, an edited tokenizer), naming them.

Exported kinds: the transformer (DNA and cells), the dilated CNN (`kind: "cnn"`, DNA; pooling
"mean") and the profile autoencoder (`kind: "mlp"`, cells). The panel transformer is not (yet).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from biomask.errors import InputError, OutputExistsError
from biomask.masking.config import describe_masking
from biomask.provenance import code_version, sha256_file

log = logging.getLogger(__name__)

MODELING = Path(__file__).with_name("hf_modeling.py")
TOKENIZATION = Path(__file__).with_name("hf_tokenization.py")
ARCH_KEYS = (
    "vocab_size",
    "modality",
    "kind",
    "d_model",
    "n_layers",
    "n_heads",
    "d_ff",
    "max_len",
    "norm_eps",
    "positions",
    "value_embedding",
    "n_bins",
    "scheme",
    "mask_indicator",
    "ratio_input",
    "embed_norm",
    "kernel_size",
)
IUPAC_AMBIGUOUS = "RYSWKMBDHV"  # and N itself
# the keys of a checkpoint's tokenizer_config.json (biomask.vocab.tokenizer_config)
TOKENIZER_CONFIG_KEYS = frozenset(
    {"tokenizer_class", "pad_token", "cls_token", "sep_token", "mask_token", "unk_token", "biomask"}
)


def encoder_state(model: Any) -> dict[str, Any]:
    """The tensors the HF model holds: the encoder (and embedder / gene statistics), not the heads."""
    kind = model.config.kind
    keep = ("encoder.", "gene_mean", "gene_std") if kind == "mlp" else ("embedder.", "encoder.")
    return {
        k: v.detach().to("cpu").float().contiguous()
        for k, v in model.state_dict().items()
        if k.startswith(keep)
    }


def dna_normalizer(lowercase: str, *, keep_spaces: bool = False) -> Any:
    """Uppercase (or N for soft-masked bases when the corpus treated them as ambiguous); IUPAC
    ambiguity letters of either case become N, as `biomask embed`'s cleaner does; whitespace (a
    pasted multi-line sequence) is dropped unless the tokens are written space-separated."""
    from tokenizers import Regex, normalizers

    ambiguous = IUPAC_AMBIGUOUS + IUPAC_AMBIGUOUS.lower() + "n"
    steps = [] if keep_spaces else [normalizers.Replace(Regex(r"\s"), "")]
    steps.append(normalizers.Replace(Regex(f"[{ambiguous}]"), "N"))
    for base in "acgt":
        steps.append(normalizers.Replace(base, "N" if lowercase == "ambiguous" else base.upper()))
    return normalizers.Sequence(steps)


def _tokenizer_files(model: Any, source: Path, target: Path, max_length: int) -> None:
    from tokenizers import Tokenizer, normalizers

    info = model.checkpoint_info
    try:  # load_pretrained checked tokenizer.json's digest: unreadable here means it was sealed so
        tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
        config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    except Exception as exc:  # OSError, JSON errors, and tokenizers' own Exception type
        raise InputError(
            f"{source}: its tokenizer files cannot be read ({type(exc).__name__}: {exc}); restore the "
            "checkpoint's own tokenizer/"
        ) from None
    # only what biomask writes (vocab.tokenizer_config): a key such as auto_map would make
    # transformers fetch and run code from elsewhere when the export is loaded with trust_remote_code
    foreign = sorted(set(config) - TOKENIZER_CONFIG_KEYS) if isinstance(config, dict) else ["(not an object)"]
    if foreign:
        raise InputError(
            f"{source / 'tokenizer_config.json'} holds keys biomask does not write ({', '.join(foreign)}); "
            "an export would hand them to transformers, which may run code they name. Restore the "
            "checkpoint's own tokenizer/"
        )
    settings = config.get("biomask") or {}
    kmers = settings.get("kind") == "overlapping_kmer"
    if model.config.modality == "dna":
        cleaning = (info.get("prep") or {}).get("cleaning") or {}
        ours = dna_normalizer(cleaning.get("lowercase", "upper"), keep_spaces=kmers)
        tokenizer.normalizer = (
            ours if tokenizer.normalizer is None else normalizers.Sequence([ours, tokenizer.normalizer])
        )
    tokenizer.save(str(target / "tokenizer.json"))
    specials = {
        k: config[k]
        for k in ("pad_token", "cls_token", "sep_token", "mask_token", "unk_token")
        if k in config
    }
    config.update(
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": int(max_length),
            "padding_side": "right",
            "model_input_names": ["input_ids", "attention_mask"],
        }
    )
    if kmers:  # a raw sequence becomes its k-mers in the remote tokenizer class
        shutil.copyfile(TOKENIZATION, target / "tokenization_biomask.py")
        config["tokenizer_class"] = "BiomaskKmerTokenizerFast"
        config["kmer_k"] = int(settings["k"])
        config["auto_map"] = {"AutoTokenizer": [None, "tokenization_biomask.BiomaskKmerTokenizerFast"]}
    (target / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (target / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    if (source / "genes.tsv").is_file():
        shutil.copyfile(source / "genes.tsv", target / "genes.tsv")


def _complete_profile(scheme: str) -> bool:
    from biomask.cells.tokenize import scheme_class

    return bool(scheme_class(scheme).complete_profile)


def hf_config(model: Any, checkpoint: Path, max_length: int) -> dict[str, Any]:
    import torch

    arch = model.config.to_dict()
    return {
        "model_type": "biomask",
        "architectures": ["BiomaskModel"],
        "auto_map": {
            "AutoConfig": "modeling_biomask.BiomaskConfig",
            "AutoModel": "modeling_biomask.BiomaskModel",
            "AutoModelForSequenceClassification": "modeling_biomask.BiomaskForSequenceClassification",
        },
        **{k: arch[k] for k in ARCH_KEYS if k in arch},
        # whether a record lists every measured panel gene (a gene it leaves out was not measured:
        # hidden), as the scheme's class says: the exported code cannot ask biomask's registry
        **({"complete_profile": _complete_profile(arch["scheme"])} if arch.get("scheme") else {}),
        # a CNN has no position table: the longest record it reads whole, not its training crop
        **({"max_len": int(max_length)} if arch.get("kind") == "cnn" else {}),
        "pooling": "mean",
        "model_max_length": int(max_length),
        "pad_token_id": 0,
        "dtype": "float32",
        "biomask": {
            "format": "biomask-hf-export",
            "exported_from": checkpoint.name if checkpoint.name != "model" else checkpoint.parent.name,
            "note": "source_checkpoint is the portable checkpoint's config.json, kept as provenance; "
            "its paths are where it was trained and are not needed to load this folder. The batch names "
            "a batch-conditioned decoder reads (architecture.batches: donors, samples) are left out with "
            "the decoder, so its config_sha256 is of the checkpoint's own config.json",
            "source_checkpoint": published_provenance(model.checkpoint_info),
            # which biomask wrote this folder (its remote code is that version's), and with what torch
            "exported_by": {**code_version(), "torch": torch.__version__},
        },
    }


def published_provenance(info: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's config.json as an export keeps it. A batch-conditioned decoder's batch names
    (a store's batch_column values: donors, patients, samples) went into the folder meant for a model
    hub, which has no decoder to read them: left out, their number kept."""
    info = json.loads(json.dumps(info, default=str))
    arch = info.get("architecture")
    if isinstance(arch, dict) and arch.get("batches"):
        arch["batches_left_out"] = len(arch.pop("batches"))
    return info


# every file an export writes (and so may replace); config.json, last, says the folder is an export
EXPORT_FILES = (
    "model.safetensors",
    "modeling_biomask.py",
    "tokenization_biomask.py",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "genes.tsv",
    "config.json",
)
CARD = "README.md"  # the model card: written where the folder has none, replaced only as written


def _held_out_lines(info: dict[str, Any]) -> str:
    """The pretraining run's held-out masked loss against its strongest reference predictor, by ratio."""
    found = info.get("eval") or {}
    loss = found.get("loss") or {}
    references = {
        name: ref for name, ref in (found.get("references") or {}).items() if ref.get("mean_loss") is not None
    }
    if not loss or found.get("mean_loss") is None:
        return "- Held-out masked loss: not recorded"
    line = f"- Held-out masked loss (the store's validation records, mean over mask ratios): {found['mean_loss']:.3f}"
    if not references:
        return line
    best = min(references, key=lambda name: references[name]["mean_loss"])
    reference = references[best].get("loss") or {}
    worse = [r for r in loss if r in reference and loss[r] > reference[r]]
    by_ratio = ", ".join(
        f"{r}: {loss[r]:.3f}" + (f" ({reference[r]:.3f})" if r in reference else "") for r in loss
    )
    return (
        f"{line}, against {references[best]['mean_loss']:.3f} for the strongest reference predictor, "
        f"{best} (lower is better). By ratio (reference): {by_ratio}"
        + (f". Worse than the reference at ratio {', '.join(worse)}" if worse else "")
    )


def card_masking(masking: dict[str, Any]) -> str:
    """The card's masking line: the scheme and its ratio as trained (a scheme's own range or the
    config's), as the report names it; "Masking: beta_sample" hid a Beta(2, 5) on [0.15, 0.45]."""
    ratio = masking.get("ratio") or {}
    if masking.get("scheme") == "r2mae" and ratio.get("kind") == "uniform":
        return (
            f"R²MAE, mask ratio ~ U({ratio.get('low')}, {ratio.get('high')}) per {ratio.get('granularity')}"
        )
    if ratio:
        return f"{masking.get('scheme')}, mask ratio {describe_masking(masking)}"
    return str(masking.get("scheme"))


def _cell_inputs(model: Any, info: dict[str, Any], config: dict[str, Any], target_sum: float) -> str:
    """The card's inputs of a cell model, as its scheme wrote its training records: which genes a record
    lists, in what order, and what its values are (a rank model's are no log1p, a binned one lists
    only the genes a cell expresses)."""
    from biomask.cells.tokenize import scheme_class
    from biomask.export.hf_modeling import LOG1P_SCHEMES

    name = info.get("scheme") or "panel"
    scheme = scheme_class(name)
    # a profile model (kind mlp) reads the values themselves, not through a token embedding
    embeds = "mlp" if model.config.kind == "mlp" else model.config.value_embedding
    values = scheme.describe_values(f"count / the cell's total count × {target_sum:,.0f}")
    if scheme.complete_profile:
        genes = (
            "every panel gene the data measures, zeros included, in `genes.tsv` order (a panel gene "
            "left out is read as unmeasured)"
        )
    elif scheme.order_free:
        genes = (
            f"the genes the cell expresses (non-zero counts), in any order (the model adds no positions); "
            f"of a cell with more than {int(config['model_max_length']) - 2:,}, its highest-valued"
        )
    else:
        genes = (
            "the genes the cell expresses, highest value first: the order is what the model reads "
            f"(positions), up to {int(config['model_max_length']) - 2:,}"
        )
    lines = [
        "- Genes: names exactly as in `genes.tsv` (case, symbols or IDs as listed there, the species",
        "  of the training data). A name the tokenizer does not know is [UNK] and carries nothing; a record",
        "  naming no panel gene is refused, one naming under half the panel is warned about.",
        f"- A record lists {genes}.",
    ]
    if embeds == "none":
        lines.append(f"- Values: the model reads none, only the genes and their order (ranked by {values}).")
    else:
        lines.append(
            f"- Values: token-aligned with the ids (0 at [CLS], [SEP] and padding), each {values}."
            + (
                f" Whole numbers above log1p({target_sum:,.0f}) look like raw counts and are warned about."
                if name in LOG1P_SCHEMES
                else ""
            )
        )
    if embeds == "bins":
        n_bins = model.config.n_bins
        lines.append(
            f"- Bins (`bins`, token-aligned): each gene's quantile of the cell's own counts, 1..{n_bins} "
            "(0 at [CLS], [SEP] and padding); the model reads these, not `values`."
        )
    lines.append("- `biomask.embed(adata, checkpoint)` builds all of this from an AnnData of counts.")
    return "\n".join(lines)


def model_card(model: Any, checkpoint: Path, config: dict[str, Any]) -> str:
    """A Hub model card: what the model is, how it was trained and measured, its inputs, how to load it."""
    info = model.checkpoint_info
    name = config["biomask"]["exported_from"]
    dna = model.config.modality == "dna"
    modality = "DNA" if dna else "single-cell expression"
    scheme = card_masking(info.get("masking") or {})
    training = info.get("training") or {}
    data = info.get("data") or {}
    sources = ", ".join(
        f"{src.get('name')} (sha256 {str(src.get('sha256'))[:12]}…)" for src in data.get("sources") or []
    )
    tags = ["biomask", "masked-pretraining", "dna" if dna else "single-cell"]
    target_sum = ((info.get("prep") or {}).get("normalise") or {}).get("target_sum") or 10_000
    if dna:
        example = (
            'batch = tok(["ACGTTGCA", "acgtnnRY"], padding=True, truncation=True, return_tensors="pt")\n'
            "vectors = model.embed(**batch)   # (B, d): biomask's embedding, pooling "
            f"{config['pooling']!r}"
        )
        inputs = f"""- Sequences: letters are uppercased, IUPAC ambiguity codes read as N, whitespace dropped. Other
  characters (U, X, `-`, digits) become [UNK], a token the model never saw; `biomask embed` refuses
  such a record.
- Length: `truncation=True` keeps the first {config["model_max_length"]} tokens. `biomask embed` embeds a
  longer record in windows and pools them; here, split it yourself.
- The vector: `model.embed(**batch)` (or `pooler_output`) is biomask's, pooled over the content tokens.
  The `feature-extraction` pipeline returns every token's state, [CLS] and [SEP] included: average
  `[1:-1]` of each record to get the same vector."""
    else:
        example = (
            "# cells: gene names plus token-aligned inputs (see Inputs below);\n"
            "# biomask.embed(adata, checkpoint) builds them for you"
        )
        inputs = _cell_inputs(model, info, config, target_sum)
    front = ["library_name: transformers"]
    if dna:  # a cell model needs `values` beside the ids: no pipeline can pass them
        front.append("pipeline_tag: feature-extraction")
    front.append(f"tags: [{', '.join(tags)}]")
    return f"""---
{chr(10).join(front)}
# license: set the weights' license before publishing (see "License" below)
---

# biomask {modality} encoder ({model.config.kind}, {scheme}, seed {training.get("seed")})

Exported with `biomask export-hf` from `{name}`. A {modality} encoder (`{model.config.kind}`,
{model.config.n_layers} layers, width {model.config.d_model}) pretrained by masked modelling with
biomask. Its config.json keeps the source checkpoint's provenance under `biomask`, including the
local paths where it was trained (not needed to load this folder); the names of the files it was
trained on are there, under Data below and in tokenizer_config.json. Edit them out before publishing
if they matter.

## Training

- Masking: {scheme}
- Training: {training.get("steps")} steps, seed {training.get("seed")}, global batch {training.get("global_batch")}, {training.get("max_length")} tokens per record
- Data: {sources or "(not recorded)"}
{_held_out_lines(info)}

No downstream task was measured for this export; biomask's `evaluate` and report give those
(linear probe, fine-tuning, clustering) against simple baselines, which a small pretrained model
does not always beat.

## Use

```python
from transformers import AutoModel, AutoTokenizer

tok = AutoTokenizer.from_pretrained("path/to/this/folder", trust_remote_code=True)
model = AutoModel.from_pretrained("path/to/this/folder", trust_remote_code=True)
{example}
```

For a classifier: `AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True,
num_labels=K)` (a new head on the pooled vector).

## Inputs

{inputs}

## Intended use and limitations

Embeddings for research: clustering, probing, transfer to labelled tasks of the same kind of data
(the same organism's DNA; cells of the same species and gene identifiers). A small model trained
briefly: measure it against simple baselines on your task before relying on it. Not for clinical
use.

## License

The code in this folder (`modeling_biomask.py`, `tokenization_biomask.py`) is biomask's, Apache-2.0.
The weights were trained on the data named above, whose terms apply to them.
"""


def _is_export(folder: Path) -> bool:
    """Whether `folder` holds an export this module wrote (its config.json says so)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("biomask") or {}).get("format") == "biomask-hf-export"


def _recorded_files(folder: Path) -> dict[str, str] | None:
    """The sha256 of every file the export in `folder` wrote, as its config.json records them
    (None for an export of a biomask that did not record them)."""
    try:
        files = (json.loads((folder / "config.json").read_text(encoding="utf-8")).get("biomask") or {}).get(
            "files_sha256"
        )
    except (OSError, ValueError, AttributeError):
        return None
    return files if isinstance(files, dict) else None


def _changed_files(folder: Path) -> list[str]:
    """Files of the export in `folder` that differ from what it wrote (deleted ones do not count:
    nothing of anyone's is lost by writing them again; an edited model card is kept, not replaced)."""
    files = _recorded_files(folder) or {}
    return sorted(
        name
        for name, digest in files.items()
        if name != CARD and (folder / name).is_file() and sha256_file(folder / name) != digest
    )


def _exports(folder: Path, model: Any) -> bool:
    """Whether `folder` is this module's export of this very checkpoint by this version of the remote
    code, every file as written — what a rerun may reuse as it is."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        same_code = (folder / "modeling_biomask.py").read_bytes() == MODELING.read_bytes()
    except (OSError, ValueError):
        return False
    recorded = config.get("biomask") or {}
    files = _recorded_files(folder)
    return (
        same_code
        and recorded.get("source_checkpoint") == published_provenance(model.checkpoint_info)
        and files is not None
        and all((folder / name).is_file() for name in files if name != CARD)  # the card may be edited
        and not _changed_files(folder)
    )


def export_hf(checkpoint: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the Hugging Face folder of a portable checkpoint (see the module docstring); returns it."""
    from biomask.embedding.inference import inference_max_length
    from biomask.models import load_pretrained
    from biomask.outputs import atomic_output_dir, check_inputs_outside
    from biomask.tensor_files import save_tensors

    checkpoint, output = Path(checkpoint).expanduser(), Path(output).expanduser()
    if _is_export(checkpoint):
        raise InputError(
            f"{checkpoint} is a Hugging Face export (what export-hf writes), not a biomask checkpoint: "
            "pass the checkpoint it was exported from (a pretraining run's model/ folder)"
        )
    model = load_pretrained(checkpoint)  # verifies the weights' and the tokenizer's checksums
    if model.config.kind not in ("transformer", "mlp", "cnn"):
        raise InputError(
            f"{checkpoint}: model kind {model.config.kind!r} cannot be exported to Hugging Face (kinds "
            "transformer, mlp and cnn can); embed with `biomask embed` or `biomask.embed` instead"
        )
    check_inputs_outside(output, [checkpoint])  # e.g. output=runs/x with checkpoint=runs/x/model
    if output.exists():
        if not output.is_dir():
            raise OutputExistsError(f"output {output} exists and is not a directory; choose another output")
        clash = sorted(p.name for p in output.iterdir() if p.name in EXPORT_FILES)
        if clash and not _is_export(output):  # files of an export's names that biomask did not write
            raise OutputExistsError(
                f"output {output} holds {', '.join(clash)}, which an export would replace, and is not a "
                "biomask Hugging Face export (no config.json with biomask.format biomask-hf-export); "
                "choose another output, or move them away"
            )
        if clash:
            if not overwrite and _exports(output, model):
                log.info("export-hf: %s is up to date (an export of this checkpoint); reusing it", output)
                return output
            if not overwrite:
                raise OutputExistsError(
                    f"output {output} holds a biomask export that is not this checkpoint's as it is now "
                    "(another checkpoint, another biomask version, or a changed or missing file); pass "
                    "--overwrite to replace it"
                )
            changed = _changed_files(output)
            if changed:  # e.g. fine-tuned weights saved over the export: not biomask's to replace
                raise OutputExistsError(
                    f"output {output}: {', '.join(changed)} changed since biomask exported them (fine-tuned "
                    "and saved there?), so --overwrite will not replace them; move them away or choose "
                    "another output"
                )
    max_length = inference_max_length(model)
    config = hf_config(model, checkpoint, max_length)
    card = output / CARD
    ours = (_recorded_files(output) or {}).get(CARD) if output.is_dir() else None
    write_card = not card.exists() or (ours is not None and sha256_file(card) == ours)
    # what else the folder holds (a model card, a git clone of a Hub repository) is never touched:
    # then the export's own files are replaced one by one instead of the folder as a whole
    mine = (*EXPORT_FILES, CARD) if write_card else EXPORT_FILES
    kept = sorted(p.name for p in output.iterdir() if p.name not in mine) if output.is_dir() else []
    staged = output.parent / f".{output.name}.export-{uuid.uuid4().hex[:8]}"  # a name nobody else has
    with atomic_output_dir(staged if kept or output.is_dir() else output) as tmp:
        save_tensors(encoder_state(model), tmp / "model.safetensors", metadata={"format": "pt"})
        shutil.copyfile(MODELING, tmp / "modeling_biomask.py")
        _tokenizer_files(model, checkpoint / "tokenizer", tmp, max_length)
        if write_card:
            (tmp / CARD).write_text(model_card(model, checkpoint, config), encoding="utf-8")
        written = sorted(p.name for p in tmp.iterdir())
        config["biomask"]["weights_sha256"] = sha256_file(tmp / "model.safetensors")
        config["biomask"]["files_sha256"] = {
            name: sha256_file(tmp / name) for name in written
        }  # what a rerun checks
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
    if staged.exists():
        for name in mine:  # config.json last: the folder reads as the new export once it is in
            if (staged / name).exists():
                os.replace(staged / name, output / name)
            elif name != CARD:
                (output / name).unlink(missing_ok=True)  # an old export's file this one does not have
        shutil.rmtree(staged, ignore_errors=True)
        if kept:
            log.info("export-hf: kept what biomask did not write in %s: %s", output, ", ".join(kept))
    log.info(
        "export-hf: %s -> %s (model_type biomask, %s, %s)",
        checkpoint,
        output,
        model.config.kind,
        model.config.modality,
    )
    return output
