"""The `biomask` command line. Each subcommand imports its stage lazily so `--help` stays fast.

Exit codes: 0 success; 1 unexpected failure; 2 bad input (a file, record, line or config key the
message names); 3 a data source could not be reached; 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from biomask import __version__
from biomask.errors import BiomaskError

log = logging.getLogger("biomask")


def _add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every config-driven stage takes."""
    parser.add_argument("-c", "--config", required=True, help="the stage's YAML config")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override config keys, e.g. tokenizer.kind=kmer split.seed=3",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output written with a different config"
    )


# ----------------------------------------------------------------------------------------- commands


def cmd_datasets_list(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from biomask import datasets

    entries = datasets.registry()
    if args.json:
        print(json.dumps({name: e.model_dump(mode="json") for name, e in entries.items()}, indent=2))
        return 0
    table = Table(title=f"biomask datasets (cache: {datasets.data_dir()})")
    for column in ("name", "modality", "kind", "size", "source", "licence", "cached"):
        # names stay whole (they are what users type); the long columns fold
        table.add_column(column, overflow="fold", no_wrap=column == "name")
    for name, e in sorted(entries.items()):
        size = f"{e.size / 1e6:.1f} MB" if e.size else "?"
        cached = "yes" if datasets.is_cached(name) else ""
        table.add_row(name, e.modality, e.kind, size, e.source.describe(), e.licence, cached)
    Console().print(table)
    return 0


def cmd_datasets_fetch(args: argparse.Namespace) -> int:
    from biomask import datasets

    names = list(datasets.registry()) if args.all else args.names
    if not names:
        raise BiomaskError("name a dataset to fetch (see `biomask datasets list`), or pass --all")
    for name in names:
        path = datasets.fetch(name, args.data_dir, force=args.force)
        print(f"{name}\t{path}")
    return 0


def cmd_prep_dna(args: argparse.Namespace) -> int:
    from biomask.config import load_config
    from biomask.dna.config import DNAPrepConfig
    from biomask.dna.prep import prep_dna

    cfg = load_config(DNAPrepConfig, args.config, args.overrides)
    path = prep_dna(cfg, overwrite=args.overwrite)
    print(path)
    return 0


def cmd_prep_cells(args: argparse.Namespace) -> int:
    from biomask.cells.config import CellsPrepConfig
    from biomask.cells.prep import prep_cells
    from biomask.config import load_config

    cfg = load_config(CellsPrepConfig, args.config, args.overrides)
    path = prep_cells(cfg, overwrite=args.overwrite)
    print(path)
    return 0


def cmd_store_verify(args: argparse.Namespace) -> int:
    from biomask.store import TokenStore

    for root in args.stores:
        store = TokenStore(root)
        count = store.verify()
        print(f"{root}: {count} files match the manifest")
    return 0


def cmd_store_info(args: argparse.Namespace) -> int:
    import json

    from biomask.store import TokenStore

    store = TokenStore(args.store)
    m = store.manifest
    summary = {
        "modality": m.get("modality"),
        "kind": m.get("kind"),
        "tokenizer": m.get("tokenizer"),
        "label_names": m.get("label_names"),
        "splits": {
            name: {k: s[k] for k in ("num_records", "num_tokens", "fixed_length")}
            | {"shards": len(s["shards"])}
            for name, s in m["splits"].items()
        },
        "stats": m.get("stats"),
        "sources": m.get("sources"),
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_main(args: argparse.Namespace) -> int:
    from biomask.main_job import run_main_job

    return run_main_job(args)


# ----------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="biomask",
        description="Masked pretraining (R²MAE and baselines) of DNA and single-cell foundation models.",
    )
    parser.add_argument("--version", action="version", version=f"biomask {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        parent: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    ds = sub.add_parser("datasets", help="the registry of real datasets").add_subparsers(
        dest="datasets_command", metavar="ACTION", required=True
    )
    p = command(
        ds, "list", cmd_datasets_list, "list registered datasets, their sources, licences and cache state"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = command(ds, "fetch", cmd_datasets_fetch, "fetch datasets into the cache (verified by sha256)")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--all", action="store_true", help="fetch every registered dataset")
    p.add_argument("--force", action="store_true", help="fetch again even if a verified copy is cached")
    p.add_argument("--data-dir", help="cache directory (default: $BIOMASK_DATA_DIR or ~/.cache/biomask/data)")

    prep = sub.add_parser("prep", help="data-preparation stages").add_subparsers(
        dest="prep_command", metavar="MODALITY", required=True
    )
    _add_stage_arguments(
        command(prep, "dna", cmd_prep_dna, "tokenize DNA (FASTA genomes, labelled tables) into a token store")
    )
    _add_stage_arguments(
        command(
            prep,
            "cells",
            cmd_prep_cells,
            "tokenize single-cell expression (h5ad, 10x, loom) into a token store of cells",
        )
    )

    store = sub.add_parser("store", help="inspect and verify token stores").add_subparsers(
        dest="store_command", metavar="ACTION", required=True
    )
    p = command(store, "verify", cmd_store_verify, "check every shard's sha256 against the manifest")
    p.add_argument("stores", nargs="+", metavar="STORE")
    p = command(store, "info", cmd_store_info, "summarise a token store")
    p.add_argument("store", metavar="STORE")

    p = command(sub, "main", cmd_main, "the main job: the built-in study on real data (see README)")
    p.add_argument("--output", default="runs/main", help="run directory (default: runs/main)")
    p.add_argument("--overwrite", action="store_true", help="recompute outputs written with another config")
    return parser


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("biomask: %(message)s"))
    root = logging.getLogger("biomask")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet, args.verbose)
    try:
        return int(args.func(args) or 0)
    except BiomaskError as exc:
        print(f"biomask: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("biomask: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
