"""A transformer over a cell's panel genes whose cell token is the embedding (kind `panel_transformer`).

    model = PanelTransformer(EncoderConfig(vocab_size=770, modality="cells", kind="panel_transformer",
                                           scheme="panel", d_model=64, n_layers=2, n_heads=4))
    out = model(masked_batch)        # {"loss", "reference_loss", "n_masked", "n_correct"}
    vectors = model.embed(batch)     # (B, d_model): the cell token's final state

Tokens: each gene a record lists is `gene embedding + value embedding(standardised value)` (a
small MLP of the continuous value, so no binning) `+ value x the gene's value direction`, after one
cell token, which starts as a learned vector plus the sum of the read genes' `value x direction`
terms / sqrt(genes read) — a linear read of the visible profile that the blocks refine. No
positions: a panel is a set of genes.

Which genes the encoder reads: the visible (not masked) genes the cell expresses, as Geneformer and
scFoundation do; a gene it does not read is zero or hidden. Reading the panel's zeros too cost 3x the
tokens and learned more slowly (measured on pbmc68k_reduced: held-out loss 0.967 vs 0.935 of the
gene-mean reference's 1.0 after 100 steps).

Why the decoder reads only the cell token: with MAE corruption the encoder never sees a masked gene, and each masked gene is predicted from the cell token's state alone: an MLP of that state,
dotted with the gene's decoder embedding, plus the gene's bias. Nothing else reaches the decoder, so whatever the reconstruction needs about this cell
has to be in the cell token — which is what `embed` returns. (A decoder that attends to the gene
tokens could copy co-expressed visible genes and leave the cell token empty.)

Cost: attention is quadratic in the genes read. In training at most `config.max_visible` of them
enter the encoder (a random subset each step, drawn from torch's RNG, which checkpoints save), so a
2,000-gene panel costs as much per step as a small one; evaluation and embedding read every expressed
gene (pbmc68k_reduced: ~250 per cell). On one CPU thread a 64-cell step at max_visible 128 takes
~0.5 s against the profile MLP's ~0.03 s.

The standardisation, the unmeasured-gene rule and the losses (MSE or a count likelihood) are the
profile autoencoder's (`biomask.models.profile.ProfileModel`). `layer` in `features` indexes
[embeddings, block 1, ..., block n] like a Python list (-1: the last block after the final LayerNorm).
"""

from __future__ import annotations

import torch
from torch import nn

from biomask.models.config import EncoderConfig
from biomask.models.profile import ProfileModel
from biomask.models.transformer import Encoder
from biomask.vocab import NUM_SPECIAL


class PanelTransformer(ProfileModel):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg)
        d = cfg.d_model
        # gene identity and value each normalised, so neither drowns the other (scGPT's encoders)
        self.gene = nn.Sequential(nn.Embedding(cfg.vocab_size, d), nn.LayerNorm(d, eps=cfg.norm_eps))
        self.value = nn.Sequential(
            nn.Linear(1, d), nn.GELU(), nn.Linear(d, d), nn.LayerNorm(d, eps=cfg.norm_eps)
        )
        # ... plus value x a per-gene direction, also summed into the cell token's starting state.
        # Without it every cell's tokens averaged to nearly the same vector (a shared value code cannot
        # say which gene has which value) and the cell token barely differed between cells at
        # initialisation (measured); with it the cell token starts as a projection of the profile
        self.gene_value = nn.Embedding(cfg.vocab_size, d)
        self.cell = nn.Parameter(torch.randn(d) * 0.02)
        self.encoder = Encoder(cfg)
        # decoder: an MLP of the cell state, read out by each gene's decoder embedding (a dot
        # product) plus the gene's bias. An MLP over (cell, gene) pairs instead learned only the
        # genes' means in 100 steps where this learns at once (measured), and costs B x V x d
        self.decode_cell = nn.Sequential(nn.Linear(d, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, d))
        self.decode_gene = nn.Embedding(cfg.vocab_size, d)
        self.decode_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        nn.init.normal_(self.decode_gene.weight, std=d**-0.5)

    def output_bias(self) -> torch.Tensor:
        return self.decode_bias

    # ------------------------------------------------------------------------------------- internals

    def _tokens(self, z: torch.Tensor, read: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cell token and the genes `read` (B, V bool) as a padded sequence: (B, 1 + L, d), mask."""
        n = read.sum(1)
        # the read genes first (stable: in gene order), then cut to the longest row
        order = torch.argsort((~read).to(torch.int8), dim=1, stable=True)[:, : int(n.max())]
        keep = torch.arange(order.shape[1], device=z.device)[None, :] < n[:, None]
        values = z.gather(1, order)[..., None]
        read_out = torch.where(keep[..., None], values * self.gene_value(order), 0.0)
        x = self.gene(order) + self.value(values) + read_out
        x = torch.where(keep[..., None], x, 0.0)
        # the cell token starts from a linear read of the visible profile (sum of value x gene
        # direction, / sqrt(genes read)); the blocks refine it
        start = read_out.sum(1, keepdim=True) / n.clamp(min=1).sqrt()[:, None, None]
        cell = self.cell + start
        mask = torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1)
        return torch.cat([cell, x], dim=1), mask

    def _visible(self, batch: dict[str, torch.Tensor], hidden: torch.Tensor, *, cap: bool) -> torch.Tensor:
        """Genes the encoder reads: the expressed ones, not hidden; with `cap`, at most max_visible
        per cell. A gene it does not read is zero or hidden: the set of genes read says which."""
        read = ~(hidden | self._missing(batch)) & (self._dense(batch, batch["values"]) > 0)
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
        return self.decode_cell(cell) @ genes.T + self.decode_bias

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
        if pooling not in self.poolings:
            raise ValueError(
                f"{pooling} pooling needs per-token vectors; a panel transformer embeds the cell token"
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

    def pooling_used(self, pooling: str) -> str:
        """What `embed(..., pooling)` returns, as `uns[key]["pooling"]` records it: the cell token."""
        return "cls"
