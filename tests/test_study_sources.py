"""Self- and continued pretraining as study options: a genome checkpoint continues on a labelled set's
own sequences (labels unused), and study-full pairs each continued run with the genome run of its seed."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from biomask.models import load_pretrained
from biomask.pipelines.plan import load_plan
from biomask.theory.ratios import RatioDist

REPO = Path(__file__).resolve().parents[1]


def _checkpoints(task) -> dict[str, str]:
    """An evaluate task's `checkpoints.NAME=PATH` overrides as {name: path}."""
    return dict(
        o.removeprefix("checkpoints.").split("=", 1) for o in task.overrides if o.startswith("checkpoints.")
    )


def test_a_genome_checkpoint_continues_on_the_splice_sequences(dna_checkpoint, splice_store, tmp_path, cli):
    out = tmp_path / "continued"
    args = [
        f"data.store={splice_store}",
        f"model.init_from={dna_checkpoint}",
        f"output={out}",
        "train.steps=4",
        "train.micro_batch_size=16",
        "train.eval_batches=1",
        "train.eval_ratios=[0.15,0.5]",
        "train.checkpoint_every=4",
        "train.progress=false",
        "optim.warmup_steps=0",
        "deepspeed.stage=0",
    ]
    code, _, err = cli("pretrain", "-c", REPO / "configs/pretrain/dna-quick.yaml", *args)
    assert code == 0, err
    info = json.loads((out / "run.json").read_text())
    genome = json.loads((dna_checkpoint / "config.json").read_text())
    # the genome weights are an input (a new genome checkpoint re-runs it), with their checksum
    # (and the steps behind them, which the continued checkpoint's config.json keeps as its lineage)
    lineage = {
        "path": str(dna_checkpoint),
        "sha256": genome["weights_sha256"],
        "steps": genome["training"]["steps"],
    }
    assert {"name": "init_from", **lineage} in info["inputs"]
    assert json.loads((out / "model" / "config.json").read_text())["init_from"] == lineage
    # the genome model's architecture, not dna-quick.yaml's, and weights that started from it
    start, end = load_pretrained(dna_checkpoint), load_pretrained(out / "model")
    assert end.config.d_model == start.config.d_model == genome["architecture"]["d_model"]
    moved = max((a - b).abs().max().item() for a, b in zip(start.parameters(), end.parameters()))
    assert 0 < moved < 0.1  # 4 steps from the genome weights, not a fresh initialisation
    # the reference predictors now count the splice training sequences
    assert info["final_eval"]["references"]["context"]["mean_loss"] > 0
    assert torch.isfinite(torch.tensor(info["final_eval"]["mean_loss"]))


def test_study_full_pairs_each_continued_run_with_the_genome_run_of_its_seed(tmp_path):
    plan = load_plan(REPO / "configs/pipelines/study-full.yaml", [f"run_dir={tmp_path}"])
    genome = {t.point["train.seed"]: t.output for t in plan.stages["pretrain_dna"].tasks
              if t.point["masking.scheme"] == "r2mae"}  # fmt: skip
    continued = plan.stages["pretrain_splice_continued"].tasks
    assert len(continued) == 5 and len(genome) == 5
    for task in continued:
        init = next(o for o in task.overrides if o.startswith("model.init_from="))
        assert init == f"model.init_from={genome[task.point['train.seed']]}/model"
        assert any(o.startswith("data.store=") and o.endswith("prep_splice") for o in task.overrides)
    # the sources evaluation scores corpus, self and both on the store's own splits (no test
    # sequence seen in self-pretraining), with five pretraining seeds each
    task = plan.stages["evaluate_splice_sources"].tasks[0]
    names = set(_checkpoints(task))
    assert names == {f"{source}@{seed}" for source in ("corpus", "self", "both") for seed in range(5)}
    assert "splits.mode=store" in task.overrides


def test_study_full_evaluates_every_cnn_scheme_over_five_pretraining_seeds(tmp_path):
    plan = load_plan(REPO / "configs/pipelines/study-full.yaml", [f"run_dir={tmp_path}"])
    runs = {
        (t.point["masking.scheme"], t.point["train.seed"]): t.output
        for t in plan.stages["pretrain_dna_cnn"].tasks
    }
    assert set(runs) == {(s, seed) for s in ("r2mae", "bert15", "fixed40", "dynamic") for seed in range(5)}
    task = plan.stages["evaluate_splice_cnn"].tasks[0]
    given = _checkpoints(task)
    # each checkpoint name is scheme@seed and points at that sweep point's model
    assert given == {f"cnn-{s}@{seed}": f"{out}/model" for (s, seed), out in runs.items()}
    assert any(o.startswith("protocols=") and "finetune" in o for o in task.overrides)  # both protocols


def test_cells_batch_pairs_each_checkpoint_with_its_sweep_point(tmp_path):
    """configs/pipelines/cells-batch.yaml: its stage configs validate, the prep keeps the batch, and
    none@s / batch@s point at the runs without / with the covariate of pretraining seed s."""
    plan = load_plan(REPO / "configs/pipelines/cells-batch.yaml", [f"run_dir={tmp_path}"])
    from biomask.cells.config import CellsPrepConfig
    from biomask.config import load_config

    prep = plan.stages["prep_cells"]
    cfg = load_config(CellsPrepConfig, prep.config, prep.tasks[0].overrides)
    assert cfg.batch_column == "batch" and cfg.labels.column == "cell_type"
    runs = {
        (t.point["model.batch_covariate"], t.point["train.seed"]): t.output
        for t in plan.stages["pretrain"].tasks
    }
    given = _checkpoints(plan.stages["evaluate"].tasks[0])
    assert given == {
        f"{'batch' if covariate else 'none'}@{seed}": f"{out}/model"
        for (covariate, seed), out in runs.items()
    }
    assert len(given) == 6


def test_cells_recipe_pairs_each_variant_checkpoint_with_its_sweep_point(tmp_path):
    # every stage config of the pipeline validates (load_plan checks them), and each checkpoint name
    # of the evaluation points at the run of the setting it is named after
    plan = load_plan(REPO / "configs/pipelines/cells-recipe.yaml", [f"run_dir={tmp_path}"])
    runs = {}
    for name, stage in plan.stages.items():
        if name.startswith("pretrain"):
            for t in stage.tasks:
                setting = next(f"{k}={v}" for k, v in t.point.items() if k != "train.seed")
                runs[(setting, t.point["train.seed"])] = t.output
    task = plan.stages["evaluate"].tasks[0]
    given = _checkpoints(task)
    assert len(given) == len(runs) == 27
    assert given["default@0"] == f"{runs[('masking.scheme=r2mae', 0)]}/model"
    assert given["scmae@2"] == f"{runs[('model.objective=scmae', 2)]}/model"
    assert given["latent-32@1"] == f"{runs[('model.d_model=32', 1)]}/model"
    assert set(given.values()) == {f"{out}/model" for out in runs.values()}


def test_dna_task_pipeline_pretrains_on_the_training_split_and_tests_on_records_it_never_read(tmp_path):
    """configs/pipelines/dna-task.yaml, pointed at a user's CSV and the motif template as its header
    says: the prep reads that CSV, each pretraining seed reads only the prep's train split, and the evaluation tests on the
    prep's own split (not a resample, which would mix pretraining records into the test) with every
    seed's checkpoint under its seed's name."""
    plan = load_plan(
        REPO / "configs/pipelines/dna-task.yaml",
        [
            f"run_dir={tmp_path}",
            "stages.prep_task.overrides.inputs=[{path: my-task.csv, format: table}]",
            "stages.evaluate.config=configs/evaluate/motif-task.yaml",
        ],
    )
    assert Path(plan.stages["evaluate"].config).name == "motif-task.yaml"
    prep = plan.stages["prep_task"].tasks[0]
    assert "inputs=[{path: my-task.csv, format: table}]" in [o.replace('"', "") for o in prep.overrides]
    pretrain = {t.point["train.seed"]: t for t in plan.stages["pretrain"].tasks}
    assert sorted(pretrain) == [0, 1, 2]
    for t in pretrain.values():
        assert f"data.store={prep.output}" in t.overrides
        assert "data.train_split=train" in t.overrides and "data.eval_split=val" in t.overrides
    evaluate = plan.stages["evaluate"].tasks[0]
    assert f"store={prep.output}" in evaluate.overrides
    assert "splits.mode=store" in evaluate.overrides
    assert _checkpoints(evaluate) == {f"self@{s}": f"{pretrain[s].output}/model" for s in (0, 1, 2)}


def test_study_gpu_runs_every_issue_scheme_over_three_seeds_and_leaves_transfer_out(tmp_path):
    """study-gpu.yaml (the one-GPU study): R²MAE, 15 %, 40 % and the dynamic schedule x 3 pretraining
    seeds for DNA and cells, each evaluated under its scheme@seed name; ZeRO-0 and fused AdamW on the
    GPU; the report lists no transfer evaluation (the study has none)."""
    from biomask.config import load_config
    from biomask.report.config import ReportConfig

    plan = load_plan(REPO / "configs/pipelines/study-gpu.yaml", [f"run_dir={tmp_path}"])
    wanted = {(s, seed) for s in ("r2mae", "bert15", "fixed40", "dynamic") for seed in range(3)}
    for pretrain, evaluate in (("pretrain_dna", "evaluate_splice"), ("pretrain_cells", "evaluate_pbmc68k")):
        runs = {
            (t.point["masking.scheme"], t.point["train.seed"]): t.output for t in plan.stages[pretrain].tasks
        }
        assert wanted <= set(runs)
        given = _checkpoints(plan.stages[evaluate].tasks[0])
        assert all(given[f"{s}@{seed}"] == f"{runs[s, seed]}/model" for s, seed in wanted)
    dna = plan.stages["pretrain_dna"].tasks[0].overrides
    assert {"deepspeed.stage=0", "optim.fused=auto", "train.steps=3000"} <= set(dna)
    report = plan.stages["report"]
    cfg = load_config(ReportConfig, report.config, report.tasks[0].overrides)
    assert set(cfg.evaluations) == {"splice", "motif", "pbmc68k"}


def test_dna_masking_probes_every_scheme_seed_on_both_tasks_under_its_name(tmp_path):
    """configs/pipelines/dna-masking.yaml: the four schemes x 3 pretraining seeds on the E. coli genome,
    plus R²MAE's p′ as a fixed ratio (3 seeds), and both task evaluations read the same scheme@seed ->
    run map on their own task store (the YAML merge shares the checkpoints; a wrong store would
    compare the schemes on one task twice)."""
    plan = load_plan(REPO / "configs/pipelines/dna-masking.yaml", [f"run_dir={tmp_path}"])
    runs = {
        (t.point["masking.scheme"], t.point["train.seed"]): t.output for t in plan.stages["pretrain"].tasks
    }
    assert set(runs) == {(s, seed) for s in ("r2mae", "bert15", "fixed40", "dynamic") for seed in range(3)}
    genome = plan.stages["prep_ecoli"].tasks[0].output
    assert all(f"data.store={genome}" in t.overrides for t in plan.stages["pretrain"].tasks)
    expected = {f"{s}@{seed}": f"{out}/model" for (s, seed), out in runs.items()}
    pprime = {t.point["train.seed"]: t for t in plan.stages["pretrain_pprime"].tasks}
    assert sorted(pprime) == [0, 1, 2]
    for seed, task in pprime.items():
        assert f"data.store={genome}" in task.overrides and "masking.scheme=custom" in task.overrides
        # the fixed ratio U(0.15, 0.45) equals under biomask's batch-mean loss (biomask.theory.ratios)
        assert {"masking.ratio.kind=fixed", "masking.ratio.value=0.289"} <= set(task.overrides)
        expected[f"pprime@{seed}"] = f"{task.output}/model"
    assert round(RatioDist(0.15, 0.45).equivalent_batch_mean, 3) == 0.289
    for evaluation, prep in (("evaluate_motif", "prep_motif"), ("evaluate_coding", "prep_coding")):
        task = plan.stages[evaluation].tasks[0]
        assert _checkpoints(task) == expected
        assert f"store={plan.stages[prep].tasks[0].output}" in task.overrides


def test_splice_human_fine_tunes_every_human_genome_seed_against_one_hot(tmp_path):
    """configs/pipelines/splice-human.yaml: issue 16's splice target outside the main job — the CNN
    pretrained on human chrX (dna-cnn-human.yaml, 15,000 steps) with 5 seeds, each probed and
    fine-tuned by the position template on splice prepared with the genome's tokenizer, and a report
    that states both targets against one-hot + LR."""
    from biomask.config import load_config
    from biomask.report.config import ReportConfig

    plan = load_plan(REPO / "configs/pipelines/splice-human.yaml", [f"run_dir={tmp_path}"])
    genome = plan.stages["prep_genome"].tasks[0].output
    runs = {t.point["train.seed"]: t for t in plan.stages["pretrain"].tasks}
    assert sorted(runs) == [0, 1, 2, 3, 4]
    assert plan.stages["pretrain"].config.name == "dna-cnn-human.yaml"
    assert all(f"data.store={genome}" in t.overrides for t in runs.values())
    splice = plan.stages["prep_splice"].tasks[0]
    assert f"tokenizer.path={genome}" in splice.overrides
    evaluate = plan.stages["evaluate"].tasks[0]
    assert plan.stages["evaluate"].config.name == "position-task.yaml"
    assert _checkpoints(evaluate) == {f"r2mae@{s}": f"{t.output}/model" for s, t in runs.items()}
    assert f"store={splice.output}" in evaluate.overrides
    report = plan.stages["report"]
    cfg = load_config(ReportConfig, report.config, report.tasks[0].overrides)
    assert {(t.evaluation, t.protocol) for t in cfg.targets} == {
        ("splice", "linear_probe"),
        ("splice", "finetune"),
    }
    assert cfg.evaluations["splice"].path == str(evaluate.output)
