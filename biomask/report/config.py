"""The schema of `biomask report` configs (the study pipelines in configs/pipelines/ fill them in)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from biomask.config import Config
from biomask.evaluation.config import Protocol

Metric = Literal["accuracy", "macro_f1", "mcc"]
# what a scanpy user reads off an embedding: Leiden on its kNN graph against the labels (the knn
# protocol's rows and the kNN baselines carry them; biomask.evaluation.clustering)
ClusterMetric = Literal["cluster_ari", "cluster_nmi", "cluster_ari_best", "cluster_nmi_best"]


class EvaluationSpec(Config):
    """An evaluate stage's output, and the metric its comparisons are judged on."""

    path: str
    metric: Metric = "mcc"
    title: str | None = None
    # every pretrained model against every other and the random init (the pretraining-data study:
    # corpus, self, both), not only R²MAE against the other schemes
    pairwise: bool = False
    # settings of these models that were chosen on this evaluation's own scores, named: the report
    # says so beside each of its targets (an interval and Holm's correction do not account for it)
    chosen_on: str | None = None


class TargetSpec(Config):
    """A claim the report checks: a protocol's score on an evaluation at least the strongest baseline's
    (for a clustering metric: `protocol: knn`, whose rows carry the Leiden scores of the embedding)."""

    evaluation: str  # a key of `evaluations`
    protocol: Protocol
    # a clustering metric is judged against the baselines that have it (PCA and all genes, on kNN)
    metric: Metric | ClusterMetric
    # what the bar is, quoted beside ours; a figure in it should name its source (a paper, an issue)
    reference: str | None = None


class EmbeddingSpec(Config):
    path: str  # an h5ad written by `biomask embed`
    color: str  # the obs column the UMAP is coloured by
    title: str | None = None
    key: str = "X_biomask"  # the obsm key the embedding is under (embed's `key`)


class ReportConfig(Config):
    output: str
    title: str = "biomask study: R²MAE against fixed-ratio masking"
    # modality label -> pretrain run directories, or directories holding several runs (a sweep)
    pretrain: dict[str, list[str]] = Field(default_factory=dict)
    # null leaves a configured evaluation out (a study without it: evaluations.pbmc68k_transfer=null)
    evaluations: dict[str, EvaluationSpec | None] = Field(default_factory=dict)
    embedding: EmbeddingSpec | None = None
    r2mae: str = "r2mae"  # the checkpoint name (in the evaluate configs) of the R²MAE model
    targets: list[TargetSpec] = Field(default_factory=list)
    # further stage outputs whose configs and checksums the report lists (e.g. the token stores)
    provenance: list[str] = Field(default_factory=list)

    @field_validator("evaluations")
    @classmethod
    def _drop_left_out(cls, value: dict[str, EvaluationSpec | None]) -> dict[str, EvaluationSpec | None]:
        return {key: spec for key, spec in value.items() if spec is not None}

    @model_validator(mode="after")
    def _targets_name_evaluations(self) -> ReportConfig:
        # a typo in a target's evaluation would drop the claim from the report with exit 0
        for i, target in enumerate(self.targets):
            if target.evaluation not in self.evaluations:
                raise ValueError(
                    f"targets[{i}].evaluation {target.evaluation!r} is not one of the evaluations "
                    f"({', '.join(self.evaluations) or 'none'}); fix the name, or drop the target"
                )
        return self
