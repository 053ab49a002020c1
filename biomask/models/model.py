"""The masked encoder: modality embedder -> transformer encoder (-> MAE decoder) -> prediction head.

    model = MaskedEncoder(EncoderConfig(vocab_size=10))
    out = model(masked_batch)                      # {"loss", "n_masked", "n_correct"}: training
    vectors = model.embed(batch, pooling="cls")    # (B, d_model): one vector per record

Inputs are the dicts of `biomask.batch.collate` (after `biomask.masking.Masker` for training):
`input_ids` and `attention_mask` (B, L), plus `values` / `bins` for cells.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from biomask.models.config import EncoderConfig
from biomask.models.transformer import Encoder
from biomask.vocab import CLS_ID, SEP_ID

POOLINGS = ("cls", "mean", "max", "concat", "mean_layers")


def pool_content(
    h: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str
) -> torch.Tensor:
    """One vector per record from the content tokens' states (never [CLS], [SEP] or padding): their
    mean, their per-feature maximum (`max`: whether a feature fired anywhere, the motif detector's
    summary), or (`concat`) every position's vector in order — records of one length only."""
    content = attention_mask & (ids != CLS_ID) & (ids != SEP_ID)
    if pooling == "concat":
        counts = content.sum(1)
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"concat pooling needs records of one length; this batch has {int(counts.min())} to "
                f"{int(counts.max())} content tokens (use mean pooling for variable lengths)"
            )
        return h[content].reshape(h.shape[0], -1)
    if pooling == "max":
        return h.masked_fill(~content[..., None], float("-inf")).amax(1)
    weights = content.to(h.dtype)[..., None]
    return (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def pool_layers(
    states: list[torch.Tensor], ids: torch.Tensor, attention_mask: torch.Tensor, layer: int
) -> torch.Tensor:
    """`mean_layers` pooling: the mean over content tokens of every block's output (the last with
    its final LayerNorm), concatenated — (B, n_blocks * d_model). `states` is [embeddings, block 1,
    ..., block n]. Why: a probe on the last block alone misses what the lower blocks detect (short
    motifs, composition) and the last block has mixed away; on a motif task (E. coli gene starts)
    every block's mean lifted the CNNs' linear probe from 0.44 to 0.48 MCC (nematode genome) and from
    0.58 to 0.61 (self-pretrained; docs/dna-models.md). It reads every block, so `layer` must be the
    default (-1)."""
    if layer != -1:
        raise ValueError(f"mean_layers pooling reads every block; layer must be -1, not {layer}")
    return torch.cat([pool_content(h, ids, attention_mask, "mean") for h in states[1:]], dim=1)


def pool_states(
    states: list[torch.Tensor], ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str, layer: int
) -> torch.Tensor:
    """One pooling of [embeddings, block 1, ..., block n] (a forward pass's `all_layers` states):
    several poolings of one forward pass cost one pass (`embed_pooled`: evaluate chooses among them)."""
    if pooling == "mean_layers":
        return pool_layers(states, ids, attention_mask, layer)
    h = states[layer]
    return h[:, 0] if pooling == "cls" else pool_content(h, ids, attention_mask, pooling)


class StatePooling:
    """Pooling checks, and several poolings from one forward pass, for the kinds whose
    `_all_states(batch)` gives [embeddings, block 1, ..., block n] (the transformer, the CNN)."""

    config: EncoderConfig

    def _all_states(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def _final_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _check_pooling(self, pooling: str, layer: int) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        n = self.config.n_layers + 1
        if not -n <= layer < n:
            raise ValueError(
                f"layer {layer} out of range for {self.config.n_layers} layers (use -{n}..{n - 1})"
            )

    @torch.no_grad()
    def embed_pooled(
        self, batch: dict[str, torch.Tensor], poolings: list[str], layer: int = -1
    ) -> dict[str, torch.Tensor]:
        """`embed` with several poolings from one forward pass: {pooling: (B, width)}."""
        for pooling in poolings:
            self._check_pooling(pooling, layer)
        if "mean_layers" in poolings or layer not in (-1, self.config.n_layers):
            states = self._all_states(batch)
        else:  # the last layer alone: every layer's states would only cost memory
            states, layer = [self._final_states(batch)], -1
        return {
            p: pool_states(states, batch["input_ids"], batch["attention_mask"], p, layer) for p in poolings
        }


class Embedder(nn.Module):
    """Token (or gene) embedding + learned positions (DNA, rank cells) + a value embedding (cells)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = nn.Embedding(cfg.max_len, cfg.d_model) if cfg.positions else None
        if cfg.value_embedding == "bins":
            self.bins = nn.Embedding(cfg.n_bins + 1, cfg.d_model)  # bin 0: masked (or no value)
        elif cfg.value_embedding == "mlp":
            self.value_mlp = nn.Sequential(
                nn.Linear(1, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, cfg.d_model)
            )
            self.value_mask = nn.Parameter(torch.zeros(cfg.d_model))  # stands in for a hidden value
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"]
        x = self.tokens(ids)
        if self.positions is not None:
            if ids.shape[1] > self.cfg.max_len:
                raise ValueError(
                    f"sequence of {ids.shape[1]} tokens exceeds the model's max_len {self.cfg.max_len}"
                )
            x = x + self.positions(torch.arange(ids.shape[1], device=ids.device))
        if self.cfg.value_embedding == "bins":
            x = x + self.bins(batch["bins"])
        elif self.cfg.value_embedding == "mlp":
            v = self.value_mlp(batch["values"].to(x.dtype)[..., None])
            hidden = batch.get("value_hidden")
            if hidden is not None:
                v = torch.where(hidden[..., None], self.value_mask.to(v.dtype), v)
            x = x + v
        return self.drop(x)


def _first_positions(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) bool -> each row's chosen positions, in order, padded to the longest row: (B, W) indices
    (padding columns point at unchosen positions) and (B, W) bool saying which columns are real.
    `states[valid]` then lists the chosen positions in the order `states_full[chosen]` would."""
    n = chosen.sum(1)
    width = max(int(n.max()), 1) if n.numel() else 1
    index = (~chosen).to(torch.int8).argsort(dim=1, stable=True)[:, :width]  # a stable sort: chosen first
    return index, torch.arange(width, device=chosen.device)[None, :] < n[:, None]


class Head(nn.Module):
    """BERT's prediction head: dense -> GELU -> LayerNorm -> output (applied to masked positions only)."""

    def __init__(self, cfg: EncoderConfig, n_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.out = nn.Linear(cfg.d_model, n_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(F.gelu(self.dense(h))))


class MaskedEncoder(StatePooling, nn.Module):
    family = "tokens"  # biomask.models.kinds.FAMILIES
    poolings = POOLINGS  # what `features` offers (evaluate's pooling: auto picks among these)

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embedder = Embedder(cfg)
        self.encoder = Encoder(cfg)
        # MAE: a light decoder that sees the encoder's states at kept positions and the mask elsewhere.
        self.decoder = Encoder(cfg, n_layers=cfg.decoder_layers) if cfg.decoder_layers > 0 else None
        n_out = {"tokens": cfg.vocab_size, "bins": cfg.n_bins + 1, "values": 1}[cfg.target]
        self.head = Head(cfg, n_out)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by depth so the residual stream's variance stays put.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, *, embeddings: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        if not embeddings:
            total -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return total

    # -------------------------------------------------------------------------------------- training

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Masked-prediction loss on the positions `batch["masked"]` (a batch from the Masker)."""
        x = self.embedder(batch)
        attention_mask, masked = batch["attention_mask"], batch["masked"]
        # only the masked positions' final states are needed: the last block computes just those
        positions, valid = _first_positions(masked)
        if self.decoder is None:
            states = self.encoder(x, attention_mask, outputs=positions)[valid]
        else:
            states = self._mae(x, attention_mask, masked, positions)[valid]
        pred = self.head(states)  # only masked positions reach the head: (n_masked, n_out)
        if self.config.target == "values":
            target = batch["target_values"][masked].float()
            loss = F.mse_loss(pred.squeeze(-1).float(), target)
            n_correct = torch.zeros((), dtype=torch.long, device=pred.device)
        else:
            target = batch["target_ids"][masked]
            loss = F.cross_entropy(pred.float(), target)
            n_correct = (pred.argmax(-1) == target).sum()
        return {
            "loss": loss,
            "n_masked": torch.tensor(target.numel(), device=pred.device),
            "n_correct": n_correct,
        }

    def _mae(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor,
        masked: torch.Tensor,
        outputs: torch.Tensor | None,
    ) -> torch.Tensor:
        """Encode only the kept tokens, then decode the full sequence (mask embeddings at masked spots);
        the decoder's last block computes only the `outputs` positions."""
        keep = attention_mask & ~masked
        index, keep_mask = _first_positions(keep)
        gather = index[..., None].expand(-1, -1, x.shape[-1])
        encoded = self.encoder(x.gather(1, gather), keep_mask)
        # Columns past a row's kept count point at distinct non-kept positions: `where` discards them.
        scattered = torch.zeros_like(x).scatter(1, gather, encoded)
        assert self.decoder is not None
        return self.decoder(torch.where(keep[..., None], scattered, x), attention_mask, outputs=outputs)

    # -------------------------------------------------------------------------------------- embeddings

    def features(self, batch: dict[str, torch.Tensor], pooling: str = "cls", layer: int = -1) -> torch.Tensor:
        """One vector per record, (B, d_model), with gradients (fine-tuning); `embed` is the same
        under `no_grad`.

        `layer` indexes [embeddings, block 1, ..., block n (final LayerNorm applied)] like a Python
        list: -1 (default) is the last layer, 0 the embeddings. `pooling`: "cls" (the [CLS] position),
        "mean" (over the record's content tokens: padding, [CLS] and [SEP] excluded), "max" (their
        per-feature maximum), "concat" (the
        content tokens' vectors concatenated in order, (B, length * d_model): position-aware, for
        fixed-length records such as splice sites, where a mean would discard where a motif sits) or
        "mean_layers" (every block's mean, concatenated: `pool_layers`).
        With MAE training, the encoder sees the whole record (nothing is dropped at embedding time).
        """
        self._check_pooling(pooling, layer)
        attention_mask = batch["attention_mask"]
        x = self.embedder(batch)
        if pooling == "mean_layers":
            states = self.encoder(x, attention_mask, all_layers=True)
            return pool_layers(states, batch["input_ids"], attention_mask, layer)
        if layer in (-1, self.config.n_layers):  # the common case: no need to keep every layer's states
            h = self.encoder(x, attention_mask)
        else:
            h = self.encoder(x, attention_mask, all_layers=True)[layer]
        if pooling == "cls":
            return h[:, 0]
        return pool_content(h, batch["input_ids"], attention_mask, pooling)

    def _all_states(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return self.encoder(self.embedder(batch), batch["attention_mask"], all_layers=True)

    def _final_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(self.embedder(batch), batch["attention_mask"])

    @torch.no_grad()
    def embed(self, batch: dict[str, torch.Tensor], pooling: str = "cls", layer: int = -1) -> torch.Tensor:
        """`features` without gradients: one vector per record, independent of the other records in
        the batch (padding is masked out)."""
        return self.features(batch, pooling, layer)
