"""Pretraining throughput and memory: biomask's encoder under the DeepSpeed engine against Hugging Face
`transformers` (`BertForMaskedLM` + `DataCollatorForLanguageModeling`, plain PyTorch loop), at the same
width, depth, sequence length and data, in one run; model FLOP utilisation against this machine's
measured fp32 matmul peak; and the MAE corruption's saving as the mask ratio grows.

    python -m benchmarks.bench_pretrain            # full: `small` preset (d 256, 4 layers), 512 tokens
    python -m benchmarks.bench_pretrain --quick    # a minute: `tiny` preset, 256 tokens

Data: real C. elegans chrX (registry `ce2-chrX`), prepared twice — one token per base (char) and
DNABERT-2-style BPE with 4,096 tokens (the vocabulary size decides how much an MLM head costs).
Every arm runs in its own fresh process (so its peak RSS is its own), arms are interleaved and
repeated. The machine is shared and noisy (other jobs only ever slow a step down), so an arm's
throughput is taken from its fastest step over all repeats; the median is recorded beside it.

MFU counts the encoder's model FLOPs per token — 6 x (encoder-layer parameters) + 12 x layers x
sequence x width (attention) — identically for both implementations (prediction heads excluded), over
the peak of a 2048^3 fp32 matmul on the same number of threads. It is the nominal model's work: during
training biomask's last block computes only the masked positions (the loss reads nothing else), which
needs ~17 % fewer FLOPs for the `small` preset at 15 % masking, so its MFU overstates its hardware
utilisation by that much -- the tokens/s ratio is the comparison that matters.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import save_result

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench"

FULL = {"preset": "small", "seq": 512, "batch": 16, "warmup": 2, "steps": 5, "repeats": 3}
QUICK = {"preset": "tiny", "seq": 256, "batch": 8, "warmup": 2, "steps": 5, "repeats": 1}


# ------------------------------------------------------------------------------------------ data


def prepare_stores(quick: bool) -> dict[str, Path]:
    """Real DNA token stores (cached under .cache/bench): char and BPE-4096 tokens."""
    from biomask.config import load_config
    from biomask.dna.config import DNAPrepConfig
    from biomask.dna.prep import prep_dna

    bases = 2_000_000 if quick else 6_000_000
    stores = {
        "char": [f"output={CACHE / f'ce2-char-{bases}'}", "windows.length=1024"],
        "bpe4096": [
            f"output={CACHE / f'ce2-bpe4096-{bases}'}",
            "windows.length=4096",
            "tokenizer.kind=bpe",
            "tokenizer.vocab_size=4096",
            "tokenizer.train_bases=2000000",
        ],
    }
    out = {}
    for name, overrides in stores.items():
        overrides += [f"windows.max_bases={bases}", "split.block_size=100000"]
        cfg = load_config(DNAPrepConfig, REPO / "configs" / "dna" / "ce2-chrX.yaml", overrides)
        out[name] = prep_dna(cfg)
    return out


# ------------------------------------------------------------------------------------------ arms (child processes)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _reset_peak_rss() -> None:
    """Linux: restart the process's RSS high-water mark (VmHWM), so the peak is the training's own."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _records(store: Path, spec: dict[str, Any]):
    """The same training records for every arm: TrainingData's seeded order and crops."""
    from biomask.store import TokenStore
    from biomask.training.data import DataSpec, TrainingData

    token_store = TokenStore(store)
    return TrainingData(
        token_store.split("train"),
        DataSpec.from_store(token_store),
        max_length=spec["seq"],
        crop="random",
        seed=0,
        micro_batch_size=spec["batch"],
        grad_accum=1,
        world_size=1,
        rank=0,
    ), DataSpec.from_store(token_store)


def _sizes(preset: str) -> dict[str, int]:
    from biomask.models.config import PRESETS

    return PRESETS[preset]


def arm_biomask(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from biomask.masking import Masker, MaskingConfig
    from biomask.models import EncoderConfig, MaskedEncoder
    from biomask.training.distributed import init_process_group, setup_env
    from biomask.training.trainer import model_inputs, param_groups

    data, dspec = _records(Path(spec["store"]), spec)
    sizes = _sizes(spec["preset"])
    mae = spec.get("corruption") == "mae"
    arch = EncoderConfig(
        vocab_size=dspec.vocab_size, **sizes, max_len=spec["seq"], decoder_layers=1 if mae else 0
    )
    torch.manual_seed(0)
    model = MaskedEncoder(arch)
    masking = MaskingConfig.model_validate(
        {
            "scheme": "custom",
            "ratio": {"kind": "fixed", "value": spec.get("ratio", 0.15)},
            "corruption": {"kind": spec.get("corruption", "mlm")},
        }
    )
    masker = Masker(masking, target="tokens", vocab_size=dspec.vocab_size, seed=0)
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4)
    if spec["engine"] == "plain":
        engine = model

        def step(batch: dict[str, torch.Tensor]) -> None:
            out = model(batch)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        import deepspeed

        init_process_group(setup_env())
        ds = json.loads((REPO / "configs" / "deepspeed" / f"zero{spec['zero']}.json").read_text())
        ds.update(
            train_micro_batch_size_per_gpu=spec["batch"], gradient_accumulation_steps=1, gradient_clipping=1.0
        )
        ds["bf16"] = {"enabled": False}
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)

        def step(batch: dict[str, torch.Tensor]) -> None:
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()

    def one(i: int) -> float:
        t0 = time.perf_counter()
        batch = data.batch(i, 0)  # collate + mask are part of the step, as the HF collator is
        step(model_inputs(masker(batch, i)))
        return time.perf_counter() - t0

    return _time_steps(one, spec, model.num_parameters())


def arm_hf(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        PreTrainedTokenizerFast,
    )

    data, dspec = _records(Path(spec["store"]), spec)
    sizes = _sizes(spec["preset"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(Path(spec["store"]) / "tokenizer" / "tokenizer.json"),
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        unk_token="[UNK]",
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)
    config = BertConfig(
        vocab_size=dspec.vocab_size,
        hidden_size=sizes["d_model"],
        num_hidden_layers=sizes["n_layers"],
        num_attention_heads=sizes["n_heads"],
        intermediate_size=sizes["d_ff"],
        max_position_embeddings=spec["seq"],
        type_vocab_size=1,
        hidden_dropout_prob=0.0,  # biomask's default; equal settings
        attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def one(i: int) -> float:
        t0 = time.perf_counter()
        # The same records as the biomask arm, framed [CLS] ... [SEP] as its collator does.
        ids = [
            [1, *data.split[j]["tokens"][: spec["seq"] - 2].tolist(), 2] for j in data.indices(i, 0).tolist()
        ]
        batch = collator([{"input_ids": x} for x in ids])
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return _time_steps(one, spec, sum(p.numel() for p in model.parameters()))


def _time_steps(one, spec: dict[str, Any], n_params: int) -> dict[str, Any]:
    import torch

    rss_before = _rss_mb()  # model, optimizer and data opened; nothing trained yet
    _reset_peak_rss()
    for i in range(spec["warmup"]):
        one(i)
    times = [one(spec["warmup"] + i) for i in range(spec["steps"])]
    return {
        "step_times_s": times,
        "tokens_per_step": spec["batch"] * spec["seq"],
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_training_mb": rss_before,
        "parameters": n_params,
        "threads": torch.get_num_threads(),
    }


def arm_peak(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    n = 1024 if spec.get("quick") else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return {"gflops": 2 * n**3 / best / 1e9, "n": n}


ARMS = {"biomask": arm_biomask, "hf": arm_hf, "peak": arm_peak}


def run_arm(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run one arm in a fresh process (its own peak memory, no state shared with other arms)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_pretrain", "--arm", json.dumps(spec)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"arm {spec} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ the benchmark


def encoder_flops_per_token(sizes: dict[str, int], seq: int) -> float:
    d, layers, ff = sizes["d_model"], sizes["n_layers"], sizes["d_ff"]
    layer_params = 4 * d * d + 4 * d + 2 * d * ff + d + ff + 4 * d  # attention, MLP, two LayerNorms
    return 6 * layers * layer_params + 12 * layers * seq * d


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny preset, short sequences, one repeat (~1-2 min)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads per arm (default 1: a shared machine)"
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--tokens",
        nargs="+",
        choices=["char", "bpe4096"],
        default=["char", "bpe4096"],
        help="which token stores",
    )
    parser.add_argument("--out", help="also write the results here (always: bench-results/pretrain.json)")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.arm:  # child process: run one arm, print its JSON
        spec = json.loads(args.arm)
        print(json.dumps(ARMS[spec["kind"]](spec)))
        return 0

    setting = dict(QUICK if args.quick else FULL)
    if args.repeats:
        setting["repeats"] = args.repeats
    sizes = _sizes(setting["preset"])
    print(
        f"bench_pretrain: preset {setting['preset']} {sizes}, seq {setting['seq']}, batch {setting['batch']}, "
        f"{args.threads} thread(s), median of {setting['steps']} steps x {setting['repeats']} repeat(s)",
        flush=True,
    )
    stores = {name: path for name, path in prepare_stores(args.quick).items() if name in args.tokens}
    load_start = os.getloadavg()[0]
    peak = max(run_arm({"kind": "peak", "quick": args.quick}, args.threads)["gflops"] for _ in range(2))
    print(f"measured fp32 matmul peak: {peak:.1f} GFLOP/s on {args.threads} thread(s)", flush=True)

    base = {k: setting[k] for k in ("preset", "seq", "batch", "warmup", "steps")}
    arms = {
        "hf BertForMaskedLM + collator": {"kind": "hf"},
        "biomask ZeRO-0 (DeepSpeed)": {"kind": "biomask", "engine": "deepspeed", "zero": 0},
        "biomask ZeRO-2 (DeepSpeed)": {"kind": "biomask", "engine": "deepspeed", "zero": 2},
        "biomask plain PyTorch": {"kind": "biomask", "engine": "plain"},
    }
    if args.quick:
        arms.pop("biomask ZeRO-2 (DeepSpeed)")
    results: dict[str, Any] = {
        "setting": setting,
        "sizes": sizes,
        "peak_gflops": peak,
        "threads": args.threads,
    }
    flops = encoder_flops_per_token(sizes, setting["seq"])
    for data_name, store in stores.items():
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
        for _ in range(setting["repeats"]):  # interleaved: noise hits every arm alike
            for name, arm in arms.items():
                runs[name].append(run_arm({**base, **arm, "store": str(store)}, args.threads))
        table = {}
        for name, rs in runs.items():
            times = [t for r in rs for t in r["step_times_s"]]
            tps = rs[0]["tokens_per_step"] / min(times)
            table[name] = {
                "tokens_per_s": tps,
                "median_tokens_per_s": rs[0]["tokens_per_step"] / statistics.median(times),
                "step_s": min(times),
                "step_times_s": times,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                "training_rss_mb": max(r["peak_rss_mb"] - r["rss_before_training_mb"] for r in rs),
                "mfu": tps * flops / (peak * 1e9),
                "parameters": rs[0]["parameters"],
            }
        hf = table["hf BertForMaskedLM + collator"]["tokens_per_s"]
        hf_median = table["hf BertForMaskedLM + collator"]["median_tokens_per_s"]
        for row in table.values():
            row["vs_hf"] = row["tokens_per_s"] / hf
            row["vs_hf_median"] = row["median_tokens_per_s"] / hf_median
        results[data_name] = table
        print(
            f"\n[{data_name} tokens, vocab {json.loads((store / 'manifest.json').read_text())['tokenizer']['vocab_size']}]"
        )
        print(
            f"{'arm':34s} {'tokens/s':>10s} {'vs HF':>7s} {'(median)':>9s} {'MFU':>6s} {'peak RSS':>9s} {'train RSS':>9s}"
        )
        for name, row in table.items():
            print(
                f"{name:34s} {row['tokens_per_s']:10.0f} {row['vs_hf']:6.2f}x {row['vs_hf_median']:8.2f}x "
                f"{row['mfu']:6.1%} {row['peak_rss_mb']:7.0f}MB {row['training_rss_mb']:7.0f}MB",
                flush=True,
            )

    # MAE: masked tokens leave the encoder input, so its cost falls as the ratio rises.
    ratios = ([0.15, 0.75] if args.quick else [0.15, 0.3, 0.5, 0.75]) if "char" in stores else []
    mae: dict[str, Any] = {}
    print(
        f"\n[MAE vs MLM, char tokens, biomask ZeRO-0]\n{'ratio':>6s} {'MLM tok/s':>10s} {'MAE tok/s':>10s} {'saving':>7s}"
    )
    for ratio in ratios:
        row = {}
        for corruption in ("mlm", "mae"):
            spec = {
                **base,
                "kind": "biomask",
                "engine": "deepspeed",
                "zero": 0,
                "store": str(stores["char"]),
                "ratio": ratio,
                "corruption": corruption,
            }
            r = run_arm(spec, args.threads)
            row[corruption] = r["tokens_per_step"] / min(r["step_times_s"])
        row["saving"] = 1 - row["mlm"] / row["mae"]  # fraction of the MLM step time saved
        mae[f"{ratio:g}"] = row
        print(f"{ratio:6.2f} {row['mlm']:10.0f} {row['mae']:10.0f} {row['saving']:6.1%}", flush=True)
    results["mae"] = mae
    results["load_average_start_end"] = [load_start, os.getloadavg()[0]]
    results["quick"] = args.quick
    path = save_result("pretrain", results)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(path.read_text())
    print(
        f"\nload average {load_start:.1f} -> {os.getloadavg()[0]:.1f} (a shared machine: compare arms, not runs)"
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
