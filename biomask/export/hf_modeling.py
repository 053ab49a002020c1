"""biomask encoders for Hugging Face `transformers` (the remote code of a `biomask export-hf` folder).

    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained("export/", trust_remote_code=True)
    model = AutoModel.from_pretrained("export/", trust_remote_code=True)
    batch = tok(["ACGTNACGT", "acgtrykm"], padding=True, return_tensors="pt")
    out = model(**batch)                         # last_hidden_state (B, L, D), pooler_output (B, D)
    vectors = model.embed(**batch, pooling="mean", layer=-1)   # = biomask's model.embed

Self-contained on purpose: this file is copied into the export as `modeling_biomask.py` and imports
torch and transformers only (not biomask), so the folder loads wherever transformers does. It rebuilds
the encoder of a biomask portable checkpoint with the same parameter names, so the weights load as
they are (the pretraining head and MAE decoder are not exported).

Inputs: `input_ids` and `attention_mask` (HF's 0/1 integers or booleans); cells also `values`
(float, token-aligned: the expression value of each gene token) and, for binned models, `bins`
(int, 1..n_bins for expressed genes, 0 at [CLS] and padding). `pooler_output` pools the last layer
as `config.pooling` says ("mean": over content tokens, [CLS]/[SEP]/padding excluded; "max": their
per-feature maximum; "cls"). Attention is torch's scaled_dot_product_attention;
`attn_implementation="eager"` at loading writes it out.
Profile models (`kind: "mlp"`, cells) read the whole profile: `last_hidden_state` is (B, 1, d_model).
The dilated CNN (`kind: "cnn"`, DNA) has no [CLS] summary: its `pooling` is "mean" (or "max", or
"concat": every content position's vector in order, records of one length).

transformers' switches: `output_attentions=True` (transformers) returns each block's attention
weights, (B, n_heads, L, L), computed explicitly (SDPA returns none; the hidden states equal SDPA's
to float rounding); `model.gradient_checkpointing_enable()` (Trainer's `gradient_checkpointing=True`)
recomputes each block in the backward pass instead of keeping its activations (token models; the
profile autoencoder has no blocks to recompute and says so).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput

PAD_ID, CLS_ID, SEP_ID, UNK_ID, NUM_SPECIAL = 0, 1, 2, 4, 5
# profile models: the share of the panel a record must name before a warning (biomask embed's
# default min_coverage)
MIN_COVERAGE = 0.5
LOG1P_SCHEMES = ("panel", "binned")  # biomask's cell schemes whose values are log1p(normalised counts)
CLIP = 10.0  # profile models: standardised values are clipped to ±10 (as in training)


class BiomaskConfig(PretrainedConfig):
    model_type = "biomask"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "intermediate_size": "d_ff",
        "max_position_embeddings": "max_len",
    }

    def __init__(
        self,
        vocab_size: int = 10,
        modality: str = "dna",
        kind: str = "transformer",
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int = 256,
        max_len: int = 1026,
        norm_eps: float = 1e-5,
        positions: bool = True,
        value_embedding: str = "none",
        n_bins: int = 0,
        scheme: str | None = None,
        pooling: str = "mean",
        model_max_length: int | None = None,
        kernel_size: int = 5,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.modality = modality
        self.kind = kind
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.d_ff = d_ff
        self.max_len = max_len
        self.norm_eps = norm_eps
        self.positions = positions
        self.value_embedding = value_embedding
        self.n_bins = n_bins
        self.scheme = scheme
        self.pooling = pooling
        self.model_max_length = model_max_length
        self.kernel_size = kernel_size
        kwargs.setdefault("pad_token_id", PAD_ID)
        super().__init__(**kwargs)


# ------------------------------------------------------------------------------------ transformer


class Embedder(nn.Module):
    def __init__(self, cfg: BiomaskConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = nn.Embedding(cfg.max_len, cfg.d_model) if cfg.positions else None
        if cfg.value_embedding == "bins":
            self.bins = nn.Embedding(cfg.n_bins + 1, cfg.d_model)
        elif cfg.value_embedding == "mlp":
            self.value_mlp = nn.Sequential(
                nn.Linear(1, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, cfg.d_model)
            )
            self.value_mask = nn.Parameter(torch.zeros(cfg.d_model))

    def forward(
        self,
        ids: torch.Tensor,
        values: torch.Tensor | None,
        bins: torch.Tensor | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.tokens(ids)
        if self.positions is not None:
            if ids.shape[1] > self.cfg.max_len:
                raise ValueError(f"{ids.shape[1]} tokens exceed the model's max_len {self.cfg.max_len}")
            # counted over the tokens the mask keeps, so a left-padded batch (tokenizer.padding_side =
            # "left") embeds a record as right padding and biomask do
            at = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)
            if mask is not None:
                at = (mask.long().cumsum(1) - 1).clamp(min=0)
            x = x + self.positions(at)
        if self.cfg.value_embedding == "bins":
            if bins is None:
                raise ValueError(
                    "this model embeds expression bins: pass `bins` (token-aligned, 0 at [CLS]/padding)"
                )
            x = x + self.bins(bins.long())
        elif self.cfg.value_embedding == "mlp":
            if values is None:
                raise ValueError("this model embeds expression values: pass `values` (token-aligned floats)")
            x = x + self.value_mlp(values.to(x.dtype)[..., None])
        return x


class SelfAttention(nn.Module):
    def __init__(self, cfg: BiomaskConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.cfg = cfg  # `attn_implementation` as loaded (from_pretrained(..., attn_implementation=...))
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # queries, keys, values in one matmul
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, L, D = x.shape
        q, k, v = (
            t.transpose(1, 2) for t in self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).unbind(2)
        )
        weights = None
        # SDPA's kernels never form the weights: the same attention written out, also for a user who
        # asks for attn_implementation="eager"
        if output_attentions or getattr(self.cfg, "_attn_implementation", None) == "eager":
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(-1)
            y = weights @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, L, D)), weights


class MLP(nn.Module):
    def __init__(self, cfg: BiomaskConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: BiomaskConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, weights = self.attn(self.ln1(x), mask, output_attentions)
        x = x + h
        return x + self.mlp(self.ln2(x)), weights


def _run_block(encoder: nn.Module, block: nn.Module, *args):
    """A block, recomputed in the backward pass when gradient checkpointing is on (while training):
    transformers' gradient_checkpointing_enable() sets the flag and the checkpoint function."""
    if encoder.gradient_checkpointing and encoder.training and torch.is_grad_enabled():
        run = getattr(encoder, "_gradient_checkpointing_func", None) or functools.partial(
            checkpoint, use_reentrant=False
        )
        return run(block.__call__, *args)
    return block(*args)


class Encoder(nn.Module):
    def __init__(self, cfg: BiomaskConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.gradient_checkpointing = False

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor, output_attentions: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """[input, block 1, ..., normalised last block] (biomask's layer indexing), and each block's
        attention weights when asked."""
        mask = None if bool(attention_mask.all()) else attention_mask[:, None, None, :]
        states, attentions = [x], []
        for block in self.blocks:
            x, weights = _run_block(self, block, x, mask, output_attentions)
            states.append(x)
            if weights is not None:
                attentions.append(weights)
        states[-1] = self.norm(x)
        return states, attentions


# ------------------------------------------------------------------------------------ dilated CNN


class ConvBlock(nn.Module):
    """x + W2 GELU(W1 GELU(DilatedConv(LayerNorm(x)))), padding zeroed before the convolution."""

    def __init__(self, cfg: BiomaskConfig, dilation: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.conv = nn.Conv1d(
            cfg.d_model,
            cfg.d_model,
            cfg.kernel_size,
            dilation=dilation,
            padding=dilation * (cfg.kernel_size - 1) // 2,
        )
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) * keep
        h = (
            self.conv(h.transpose(1, 2)).transpose(1, 2).contiguous()
        )  # a fast GELU backward: biomask.models.cnn
        return x + self.proj(F.gelu(self.fc(F.gelu(h))))


class ConvEncoder(nn.Module):
    def __init__(self, cfg: BiomaskConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ConvBlock(cfg, 2**i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """[embeddings, block 1, ..., normalised last block] (biomask's layer indexing)."""
        keep = attention_mask[..., None].to(x.dtype)
        states = [x]
        for block in self.blocks:
            x = _run_block(self, block, x, keep)
            states.append(x)
        states[-1] = self.norm(x)
        return states


# ------------------------------------------------------------------------------------ profile (mlp)


def _stack(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------ the model


class BiomaskPreTrainedModel(PreTrainedModel):
    """What the exported model classes share: the config, weight initialisation, and saving."""

    config_class = BiomaskConfig
    base_model_prefix = "biomask"
    main_input_name = "input_ids"
    # attention is torch's scaled_dot_product_attention (the default); "eager" writes it out
    _supports_sdpa = True

    @property
    def supports_gradient_checkpointing(self) -> bool:  # type: ignore[override]
        # token models recompute block by block; the profile autoencoder is a few linear layers with
        # no blocks (nor token embeddings, which transformers makes require grad): a clear refusal
        return self.config.kind != "mlp"

    def _init_weights(self, module: nn.Module) -> None:
        # Every weight comes from the checkpoint; this only initialises a model built from a config
        # (and a classifier's new head).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As transformers loads, and a folder biomask exported is checked against the weights' sha256
        its config.json records: an edited model.safetensors loaded silently before. A folder saved
        again by transformers (`save_pretrained`) records no digest and loads as transformers loads."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        _check_exported_weights(pretrained_model_name_or_path, getattr(model.config, "biomask", None))
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers saves, with the provenance saying the folder is no longer biomask's export
        as written (its weights may be fine-tuned): `biomask export-hf` then leaves it alone."""
        _mark_saved(self.config)
        return super().save_pretrained(save_directory, *args, **kwargs)


class BiomaskModel(BiomaskPreTrainedModel):
    def __init__(self, config: BiomaskConfig) -> None:
        super().__init__(config)
        if config.kind == "mlp":
            hidden = [config.d_ff] * (config.n_layers - 1)
            self.encoder = _stack(
                [2 * config.vocab_size + int(getattr(config, "ratio_input", False)), *hidden, config.d_model]
            )
            self.register_buffer("gene_mean", torch.zeros(config.vocab_size))
            self.register_buffer("gene_std", torch.ones(config.vocab_size))
        elif config.kind == "transformer":
            self.embedder = Embedder(config)
            self.encoder = Encoder(config)
        elif config.kind == "cnn":
            self.embedder = nn.Embedding(config.vocab_size, config.d_model)
            self.encoder = ConvEncoder(config)
        else:
            raise ValueError(f"unknown biomask model kind {config.kind!r}")
        self.post_init()

    # ------------------------------------------------------------------------------ states

    def _states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        values: torch.Tensor | None,
        bins: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """(states, mask, each block's attention weights: only when asked)."""
        mask = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        if output_attentions and self.config.kind != "transformer":
            raise ValueError(
                f"output_attentions: this model (kind {self.config.kind!r}) has no attention layers; "
                "only transformer exports return attention weights"
            )
        if self.config.kind == "mlp":
            return self._profile_states(input_ids, mask, values), mask, []
        if self.config.kind == "cnn":
            return self.encoder(self.embedder(input_ids), mask), mask, []
        states, attentions = self.encoder(
            self.embedder(input_ids, values, bins, mask), mask, output_attentions
        )
        return states, mask, attentions

    def _profile_states(
        self, ids: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None
    ) -> list[torch.Tensor]:
        if values is None:
            raise ValueError("a profile model reads expression: pass `values` (token-aligned floats)")
        n = self.config.vocab_size
        # genes outside the panel ([UNK]) and the specials carry no value, as biomask drops them
        genes = mask & (ids >= NUM_SPECIAL)

        def dense(field: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(ids.shape[0], n, dtype=torch.float32, device=ids.device)
            return out.scatter_add_(1, ids, torch.where(genes, field.float(), 0.0))

        listed_times = dense(torch.ones_like(values, dtype=torch.float32))
        if bool((listed_times > 1).any()):
            rows = sorted({int(r) for r in (listed_times > 1).any(1).nonzero().flatten()})
            raise ValueError(
                f"record(s) {rows[:5]} list a gene more than once: sum its counts before normalising "
                "(as biomask's prep does), then list each gene once"
            )
        self._check_profile_inputs(ids, mask, values, listed_times)
        z = ((dense(values) - self.gene_mean) / self.gene_std).clamp(-CLIP, CLIP)
        # a panel gene a complete-profile record leaves out was not measured: hidden (exports
        # written before `complete_profile` was recorded: the panel scheme, the only one then)
        if getattr(self.config, "complete_profile", self.config.scheme == "panel"):
            listed = listed_times > 0
            listed[:, :NUM_SPECIAL] = True
            hidden = ~listed
        else:
            hidden = torch.zeros_like(z, dtype=torch.bool)
        shown = getattr(self.config, "mask_indicator", True)  # biomask's ablation switch
        indicator = hidden.to(z.dtype) if shown else torch.zeros_like(z)
        h = torch.cat([torch.where(hidden, 0.0, z), indicator], dim=1)
        if getattr(self.config, "ratio_input", False):  # the share of the panel hidden
            h = torch.cat([h, hidden[:, NUM_SPECIAL:].float().mean(1, keepdim=True)], dim=1)
        states = [z]
        h = h.to(self.gene_mean.dtype)  # a model loaded in float16 / bfloat16 computes in it
        for module in self.encoder:
            h = module(h)
            if isinstance(module, nn.Linear):
                states.append(h)
        if getattr(self.config, "embed_norm", "none") == "l2":  # the cell embedding at unit length
            states[-1] = F.normalize(states[-1], dim=1)
        return states

    def _check_profile_inputs(
        self, ids: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, listed_times: torch.Tensor
    ) -> None:
        """What `biomask embed` refuses or warns about, said here too: the model cannot tell a wrong
        input from a cell, and each of these gives a plausible vector."""
        specials = mask & ((ids == CLS_ID) | (ids == SEP_ID))
        if bool((torch.where(specials, values.float(), 0.0) != 0).any()):
            raise ValueError(
                "`values` holds a non-zero value at a [CLS] or [SEP] position: values are token-aligned "
                "(the same shape as input_ids, 0 at [CLS], [SEP] and padding), so the first gene's value "
                "goes in column 1; shifted values pair every gene with another's"
            )
        named = (listed_times[:, NUM_SPECIAL:] > 0).sum(1)
        unknown = (mask & (ids == UNK_ID)).sum(1)
        # a record listing genes, none of them the panel's (a record of no genes at all is a cell that
        # expresses none: biomask embeds it)
        lost = (named == 0) & (unknown > 0)
        if bool(lost.any()):
            rows = lost.nonzero().flatten().tolist()
            raise ValueError(
                f"record(s) {rows[:5]} name no gene of the model's panel ({int(unknown[rows[0]])} of the "
                f"first one's genes are [UNK]): every such record gets the same vector. Gene names are "
                "matched exactly as in genes.tsv (its case, symbols or Ensembl IDs as listed there, its "
                "species)"
            )
        panel = self.config.vocab_size - NUM_SPECIAL
        if getattr(self.config, "complete_profile", self.config.scheme == "panel"):
            low = named.float() / panel < MIN_COVERAGE
            if bool(low.any()):
                first = int(low.nonzero()[0, 0])
                warnings.warn(
                    f"{int(low.sum())} record(s) name under {MIN_COVERAGE:.0%} of the model's {panel:,} panel "
                    f"genes (record {first}: {int(named[first])}, {int(unknown[first])} [UNK]): the others "
                    "are read as unmeasured. Check the gene names against genes.tsv",
                    stacklevel=4,
                )
        # log1p(count / library size * target_sum) is at most log1p(target_sum); whole numbers above it
        # are counts. Only these schemes' values are log1p (rank's are divided by a gene's median; a
        # contributor's scheme may hold anything): warning another's would be wrong
        if self.config.scheme not in LOG1P_SCHEMES:
            return
        source = (getattr(self.config, "biomask", None) or {}).get("source_checkpoint") or {}
        target_sum = float(((source.get("prep") or {}).get("normalise") or {}).get("target_sum") or 10_000)
        shown = torch.where(mask & (ids >= NUM_SPECIAL), values.float(), 0.0)
        counts = (shown == shown.round()).all(1) & (shown > math.log1p(target_sum)).any(1)
        if bool(counts.any()):
            warnings.warn(
                f"{int(counts.sum())} record(s) hold only whole numbers, some above log1p({target_sum:,.0f}) = "
                f"{math.log1p(target_sum):.2f}: raw counts, it seems. The model reads log1p(count / the "
                f"cell's total count * {target_sum:,.0f}) (biomask.embed computes it from counts)",
                stacklevel=4,
            )

    def _pool(
        self, h: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, pooling: str
    ) -> torch.Tensor:
        if self.config.kind == "mlp":
            return h
        content = mask & (input_ids != CLS_ID) & (input_ids != SEP_ID)
        if pooling == "cls" and self.config.kind == "cnn":
            raise ValueError(
                "a CNN has no [CLS] summary (its first position sees the record's start): "
                "use pooling 'mean', 'max' or 'concat'"
            )
        if pooling == "cls":
            return h[:, 0]
        empty = ~content.any(1)
        if bool(empty.any()):  # biomask refuses an empty record too; a mean of nothing is no vector
            rows = [int(r) for r in empty.nonzero().flatten()][:5]
            raise ValueError(f"record(s) {rows} have no tokens between [CLS] and [SEP] (an empty sequence?)")
        if pooling == "concat":
            counts = content.sum(1)
            if bool((counts != counts[0]).any()):
                raise ValueError("concat pooling needs records of one length (use pooling 'mean')")
            return h[content].reshape(h.shape[0], -1)
        if pooling == "max":
            return h.masked_fill(~content[..., None], float("-inf")).amax(1)
        if pooling != "mean":
            raise ValueError(f"pooling must be 'mean', 'max', 'cls' or 'concat', not {pooling!r}")
        weights = content.to(h.dtype)[..., None]
        return (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    # ------------------------------------------------------------------------------ public

    def get_input_embeddings(self) -> nn.Module | None:
        """The token embedding (token models); a profile model reads values, not token vectors."""
        if self.config.kind == "transformer":
            return self.embedder.tokens
        return self.embedder if self.config.kind == "cnn" else None

    def set_input_embeddings(self, value: nn.Module) -> None:
        if self.config.kind == "transformer":
            self.embedder.tokens = value
        elif self.config.kind == "cnn":
            self.embedder = value
        else:
            raise ValueError("a profile model (kind mlp) has no token embedding")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        bins: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ):
        """`last_hidden_state` (B, L, d_model) and `pooler_output` (B, d_model, `config.pooling`);
        `hidden_states` = (embeddings, block 1, ..., normalised last block) and `attentions` (one
        (B, n_heads, L, L) tensor per block, each query's weights over the keys; padding gets 0) when
        asked. Extra tokenizer outputs such as `token_type_ids` are ignored."""
        if output_hidden_states is None:  # transformers' convention: the config's setting by default
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))
        if output_attentions is None:
            output_attentions = bool(getattr(self.config, "output_attentions", False))
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        states, mask, attentions = self._states(input_ids, attention_mask, values, bins, output_attentions)
        last = states[-1]
        pooled = self._pool(last, input_ids, mask, self.config.pooling)
        if self.config.kind == "mlp":
            last = last[:, None, :]
        hidden = tuple(states) if output_hidden_states else None
        weights = tuple(attentions) if output_attentions else None
        if return_dict is False:
            return tuple(v for v in (last, pooled, hidden, weights) if v is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=last, pooler_output=pooled, hidden_states=hidden, attentions=weights
        )

    @torch.no_grad()
    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        bins: torch.Tensor | None = None,
        pooling: str | None = None,
        layer: int = -1,
        **kwargs,
    ) -> torch.Tensor:
        """One vector per record, (B, d_model): biomask's `model.embed(batch, pooling, layer)`.
        `layer` indexes [embeddings, block 1, ..., last block] like a Python list; pooling
        "mean_layers" (token models) concatenates every block's mean, (B, n_layers * d_model)."""
        states, mask, _ = self._states(input_ids, attention_mask, values, bins)
        pooling = pooling or self.config.pooling
        if pooling == "mean_layers" and self.config.kind != "mlp":  # every block's mean, in order
            if layer != -1:
                raise ValueError(f"mean_layers pooling reads every block; layer must be -1, not {layer}")
            return torch.cat([self._pool(h, input_ids, mask, "mean") for h in states[1:]], dim=1)
        if not -len(states) <= layer < len(states):
            raise ValueError(
                f"layer {layer} does not exist: the model has {len(states) - 1} blocks, so layer is "
                f"-{len(states)}..{len(states) - 1} (-1: the last block, 0: the embeddings)"
            )
        return self._pool(states[layer], input_ids, mask, pooling)


def _check_exported_weights(folder, info) -> None:
    import hashlib
    import os

    weights = os.path.join(str(folder), "model.safetensors")
    recorded = info.get("weights_sha256") if isinstance(info, dict) else None
    if not recorded or info.get("format") != "biomask-hf-export" or not os.path.isfile(weights):
        return  # a hub id, or a folder transformers saved again
    digest = hashlib.sha256()
    with open(weights, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != recorded:
        raise ValueError(
            f"{weights} is not the file biomask exported: its sha256 {digest.hexdigest()[:12]}… differs from "
            f"the weights_sha256 {recorded[:12]}… in config.json; export the checkpoint again"
        )


def _mark_saved(config: BiomaskConfig) -> None:
    info = getattr(config, "biomask", None)
    if isinstance(info, dict) and info.get("format") == "biomask-hf-export":
        info = dict(info)
        info["format"] = "saved-from-biomask-hf-export"  # the weights' recorded digests no longer apply
        info.pop("weights_sha256", None)
        info.pop("files_sha256", None)
        config.biomask = info


class BiomaskForSequenceClassification(BiomaskPreTrainedModel):
    """The encoder with a classification head on its pooled vector (`config.pooling`), for
    transformers' Trainer: `AutoModelForSequenceClassification.from_pretrained(export,
    trust_remote_code=True, num_labels=K)`. The head is new (initialised here); the encoder's weights
    load from the export. `labels` give the loss: cross-entropy, or MSE when num_labels is 1."""

    def __init__(self, config: BiomaskConfig) -> None:
        if config.pooling == "concat":
            raise ValueError(
                "sequence classification reads one vector per record: load with pooling='mean' or "
                "'max' (concat's width depends on the record's length)"
            )
        super().__init__(config)
        self.num_labels = config.num_labels
        self.biomask = BiomaskModel(config)
        self.dropout = nn.Dropout(float(getattr(config, "classifier_dropout", None) or 0.1))
        self.classifier = nn.Linear(config.d_model, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        bins: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ):
        out = self.biomask(
            input_ids,
            attention_mask=attention_mask,
            values=values,
            bins=bins,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits, labels.long())
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        if return_dict is False:
            return tuple(v for v in (loss, logits, out.hidden_states, out.attentions) if v is not None)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )
