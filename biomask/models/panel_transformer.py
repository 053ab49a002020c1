"""A transformer over a cell's panel genes whose cell token is the embedding (kind `panel_transformer`).

    model = PanelTransformer(EncoderConfig(vocab_size=770, modality="cells", kind="panel_transformer",
                                           scheme="panel", d_model=64, n_layers=2, n_heads=4))
    out = model(masked_batch)        # {"loss", "reference_loss", "n_masked", "n_correct"}
    vectors = model.embed(batch)     # (B, d_model): the cell token's final state

Tokens: each gene a record lists is `gene embedding + value embedding(standardised value)` (a
small MLP of the continuous value, so no binning), after one learned cell token. No positions: a
panel is a set of genes.

Why the decoder reads only the cell token: with MAE corruption the encoder reads only the visible
genes, and each masked gene is predicted from (cell token state, that gene's decoder embedding) by
a small MLP. Nothing else reaches the decoder, so whatever the reconstruction needs about this cell
has to be in the cell token — which is what `embed` returns. (A decoder that attends to the gene
tokens could copy co-expressed visible genes and leave the cell token empty.)

Cost: attention is quadratic in the genes read. In training at most `config.max_visible` visible
genes enter the encoder (a random subset each step, drawn from torch's RNG, which checkpoints save),
so a 2,000-gene panel costs as much per step as a 256-gene one; evaluation and embedding read every
listed gene (765 genes: ~0.6 M attention scores per head and cell).

The standardisation, the unmeasured-gene rule and the losses (MSE or a count likelihood) are the
profile autoencoder's (`biomask.models.profile.ProfileModel`). `layer` in `features` indexes
[embeddings, block 1, ..., block n] like a Python list (-1: the last block after the final LayerNorm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from biomask.models.config import EncoderConfig
from biomask.models.profile import ProfileModel
from biomask.models.transformer import Encoder
from biomask.vocab import NUM_SPECIAL


class PanelTransformer(ProfileModel):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg)
        d = cfg.d_model
        self.gene = nn.Embedding(cfg.vocab_size, d)
        self.value = nn.Sequential(nn.Linear(1, d), nn.GELU(), nn.Linear(d, d))
        self.cell = nn.Parameter(torch.randn(d) * 0.02)
        self.encoder = Encoder(cfg)
        # decoder: MLP(cell state, gene) -> one value per gene; d_model wide, since it runs for every
        # (cell, gene) pair (a d_ff-wide one cost as much as the encoder, measured)
        self.decode_cell = nn.Linear(d, d)
        self.decode_gene = nn.Embedding(cfg.vocab_size, d)
        self.decode_out = nn.Linear(d, 1, bias=False)
        self.decode_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        nn.init.normal_(self.gene.weight, std=0.02)
        nn.init.normal_(self.decode_gene.weight, std=0.02)

    def output_bias(self) -> torch.Tensor:
        return self.decode_bias

    # ------------------------------------------------------------------------------------- internals

    def _tokens(self, z: torch.Tensor, read: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cell token and the genes `read` (B, V bool) as a padded sequence: (B, 1 + L, d), mask."""
        n = read.sum(1)
        # the read genes first (stable: in gene order), then cut to the longest row
        order = torch.argsort((~read).to(torch.int8), dim=1, stable=True)[:, : int(n.max())]
        keep = torch.arange(order.shape[1], device=z.device)[None, :] < n[:, None]
        x = self.gene(order) + self.value(z.gather(1, order)[..., None])
        x = torch.where(keep[..., None], x, 0.0)
        cell = self.cell.expand(z.shape[0], 1, -1)
        mask = torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1)
        return torch.cat([cell, x], dim=1), mask

    def _visible(self, batch: dict[str, torch.Tensor], hidden: torch.Tensor, *, cap: bool) -> torch.Tensor:
        """Genes the encoder reads: listed, not hidden; with `cap`, at most max_visible per cell."""
        read = ~(hidden | self._missing(batch))
        read[:, :NUM_SPECIAL] = False
        limit = self.config.max_visible
        if cap and limit and int(read.sum(1).max()) > limit:
            score = torch.where(read, torch.rand(read.shape, device=read.device), -1.0)
            top = score.topk(limit, dim=1)
            read = torch.zeros_like(read).scatter_(1, top.indices, top.values >= 0)
        return read

    def _decode(self, cell: torch.Tensor) -> torch.Tensor:
        """(B, d) cell states -> (B, V) predictions for every gene column."""
        genes = self.decode_gene(torch.arange(self.config.vocab_size, device=cell.device))
        h = F.gelu(self.decode_cell(cell)[:, None, :] + genes[None, :, :])
        return self.decode_out(h).squeeze(-1) + self.decode_bias

    # -------------------------------------------------------------------------------------- training

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The masked genes' reconstruction loss, through the cell token only (MAE: the encoder
        never sees a masked gene)."""
        z = self._standardised(batch)
        hidden = self._dense(batch, batch["masked"]) > 0
        x, mask = self._tokens(z, self._visible(batch, hidden, cap=self.training))
        cell = self.encoder(x, mask)[:, 0]
        return self.reconstruction(batch, self._decode(cell), z, hidden)

    # ------------------------------------------------------------------------------------ embeddings

    def features(
        self, batch: dict[str, torch.Tensor], pooling: str = "mean", layer: int = -1
    ) -> torch.Tensor:
        """The cell token's state over every listed gene, with gradients (fine-tuning). The cell token
        is the embedding the objective trains, so `pooling` "cls" and "mean" both return it."""
        if pooling == "concat":
            raise ValueError(
                "concat pooling needs per-token vectors; a panel transformer embeds the cell token"
            )
        n = self.config.n_layers + 1
        if not -n <= layer < n:
            raise ValueError(
                f"layer {layer} out of range for {self.config.n_layers} layers (use -{n}..{n - 1})"
            )
        z = self._standardised(batch)
        x, mask = self._tokens(z, self._visible(batch, torch.zeros_like(z, dtype=torch.bool), cap=False))
        states = self.encoder(x, mask, all_layers=True)
        return states[layer % n][:, 0]

    @torch.no_grad()
    def embed(self, batch: dict[str, torch.Tensor], pooling: str = "mean", layer: int = -1) -> torch.Tensor:
        return self.features(batch, pooling, layer)
