"""Pretraining throughput and memory: biomask's encoder under the DeepSpeed engine against Hugging Face
`transformers` (`BertForMaskedLM` + `DataCollatorForLanguageModeling`, plain PyTorch loop), at the same
width, depth, sequence length and data, in one run; model FLOP utilisation against this machine's
measured fp32 matmul peak; and the MAE corruption's saving as the mask ratio grows.

    python -m benchmarks.bench_pretrain            # full: `small` preset (d 256, 4 layers), then `tiny`, 512 tokens
    python -m benchmarks.bench_pretrain --quick    # a minute: `tiny` preset, 256 tokens
    python -m benchmarks.bench_pretrain --device cuda   # only the GPU section: bf16, `base` preset

Where torch sees a GPU, the default run adds a bf16 section on it (`base` preset, seq 512, batch 32):
HF with autocast (the HF Trainer's `bf16=True`) against biomask's trainer setting (`train.precision`
bf16: DeepSpeed's torch_autocast over fp32 weights) and DeepSpeed's bf16-weights mode, MFU against the
GPU's measured bf16 matmul peak, peak GPU memory.

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
# GPU (bf16): BERT-base size, where a GPU's matmul units are the bottleneck rather than Python.
GPU = {"preset": "base", "seq": 512, "batch": 32, "warmup": 5, "steps": 20, "repeats": 2}


# ------------------------------------------------------------------------------------------ data


def prepare_stores(quick: bool, names: list[str] | None = None) -> dict[str, Path]:
    """Real DNA token stores (cached under .cache/bench): char and BPE-4096 tokens (or those `names`)."""
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
        if names is not None and name not in names:
            continue
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


def _device(spec: dict[str, Any]):
    """The arm's device and whether it computes in bf16 (GPU arms) or fp32 (CPU arms). `precision` takes
    train.precision's values: fp32, bf16 (autocast over fp32 weights), bf16-weights (DeepSpeed's bf16)."""
    import torch

    return torch.device(spec.get("device", "cpu")), spec.get("precision", "fp32") != "fp32"


def arm_biomask(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from biomask.masking import Masker, MaskingConfig
    from biomask.models import EncoderConfig, MaskedEncoder
    from biomask.training.distributed import init_process_group, setup_env
    from biomask.training.trainer import adamw_kernel, model_inputs, param_groups, to_device

    device, bf16 = _device(spec)
    data, dspec = _records(Path(spec["store"]), spec)
    sizes = _sizes(spec["preset"])
    mae = spec.get("corruption") == "mae"
    arch = EncoderConfig(
        vocab_size=dspec.vocab_size, **sizes, max_len=spec["seq"], decoder_layers=1 if mae else 0
    )
    torch.manual_seed(0)
    model = MaskedEncoder(arch).to(device)
    masking = MaskingConfig.model_validate(
        {
            "scheme": "custom",
            "ratio": {"kind": "fixed", "value": spec.get("ratio", 0.15)},
            "corruption": {"kind": spec.get("corruption", "mlm")},
        }
    )
    masker = Masker(masking, target="tokens", vocab_size=dspec.vocab_size, seed=0, device=device)
    # optim.fused as the trainer reads it (auto: torch's fused kernel on a GPU)
    optimizer = torch.optim.AdamW(
        param_groups(model, 0.01), lr=1e-4, **adamw_kernel(spec.get("fused", "auto"), device)
    )
    if spec["engine"] == "plain":
        if spec.get("compile"):
            model.compile()
        engine = model

        def step(batch: dict[str, torch.Tensor]) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(batch)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        import deepspeed

        from biomask.training.ds_config import preset_config

        init_process_group(setup_env())
        # The trainer's own DeepSpeed config for this ZeRO stage and train.precision.
        ds = preset_config(
            spec["zero"], micro_batch_size=spec["batch"], precision=spec.get("precision", "fp32")
        )
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
        if spec.get("compile"):  # train.compile: the trainer's own call
            engine.compile()

        def step(batch: dict[str, torch.Tensor]) -> None:
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()

    def make_batch(i: int) -> dict[str, torch.Tensor]:
        return model_inputs(masker(to_device(data.batch(i, 0), device), i))

    return _time_steps(make_batch, step, spec, model.num_parameters())


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
    device, bf16 = _device(spec)
    torch.manual_seed(0)
    model = BertForMaskedLM(config).to(device)
    if spec.get("compile"):  # the HF Trainer's torch_compile=True
        model.compile()
    # on a GPU, torch's fused AdamW, as HF users get it (the HF Trainer's optim="adamw_torch_fused")
    fused = {"fused": True} if spec.get("fused", "auto") in ("auto", True) and device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, **fused)

    def make_batch(i: int) -> dict[str, torch.Tensor]:
        # The same records as the biomask arm, framed [CLS] ... [SEP] as its collator does.
        ids = [
            [1, *data.split[j]["tokens"][: spec["seq"] - 2].tolist(), 2] for j in data.indices(i, 0).tolist()
        ]
        return {k: v.to(device) for k, v in collator([{"input_ids": x} for x in ids]).items()}

    def step(batch: dict[str, torch.Tensor]) -> None:
        # bf16 as the HF Trainer does it (`bf16=True`): autocast over fp32 weights.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _time_steps(make_batch, step, spec, sum(p.numel() for p in model.parameters()))


def _time_steps(make_batch, step, spec: dict[str, Any], n_params: int) -> dict[str, Any]:
    """Time `step` on successive batches. On CPU the batch is built (collated, masked) inside the timed
    step, as a collator does; on a GPU batches are built beforehand -- in training, data workers and
    asynchronous kernels hide that host work, and timing it would measure Python, not the model."""
    import torch

    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    n = spec["warmup"] + spec["steps"]
    prebuilt = [make_batch(i) for i in range(n)] if cuda else None

    def one(i: int) -> float:
        t0 = time.perf_counter()
        step(prebuilt[i] if prebuilt else make_batch(i))
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    rss_before = _rss_mb()  # model, optimizer and data opened; nothing trained yet
    _reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(spec["warmup"]):
        one(i)
    times = [one(spec["warmup"] + i) for i in range(spec["steps"])]
    return {
        "step_times_s": times,
        "tokens_per_step": spec["batch"] * spec["seq"],
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_training_mb": rss_before,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "parameters": n_params,
        "threads": torch.get_num_threads(),
    }


def arm_peak(spec: dict[str, Any]) -> dict[str, Any]:
    """The machine's measured matmul peak: fp32 on CPU, bf16 on a GPU."""
    import torch

    device, bf16 = _device(spec)
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024 if spec.get("quick") else 2048
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(20 if cuda else 5):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    name = torch.cuda.get_device_name(device) if cuda else None
    return {"gflops": 2 * n**3 / best / 1e9, "n": n, "dtype": str(dtype), "device_name": name}


def cuda_available() -> bool:
    """Asked in a child process, so the parent never initialises CUDA or DeepSpeed's accelerator."""
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip().endswith("True")


ARMS = {"biomask": arm_biomask, "hf": arm_hf, "peak": arm_peak}


def run_arm(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run one arm in a fresh process (its own peak memory, no state shared with other arms)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    if spec.get("device") == "cuda":
        env.update(DS_ACCELERATOR="cuda")
    else:  # CPU arms see no GPU (the process group would otherwise pick NCCL)
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
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


HF_ARM = "hf BertForMaskedLM + collator"
ZERO0_ARM = "biomask ZeRO-0 (DeepSpeed)"
ZERO2_ARM = "biomask ZeRO-2 (DeepSpeed)"


def compared_arms(**extra: Any) -> dict[str, dict[str, Any]]:
    """The peer and biomask's three ways to train, each spec extended by `extra` (e.g. the device)."""
    return {
        HF_ARM: {"kind": "hf", **extra},
        ZERO0_ARM: {"kind": "biomask", "engine": "deepspeed", "zero": 0, **extra},
        ZERO2_ARM: {"kind": "biomask", "engine": "deepspeed", "zero": 2, **extra},
        "biomask plain PyTorch": {"kind": "biomask", "engine": "plain", **extra},
    }


def compare(
    stores: dict[str, Path],
    setting: dict[str, Any],
    arms: dict[str, dict[str, Any]],
    peak: float,
    threads: int,
) -> dict[str, Any]:
    """Every arm on every token store, interleaved and repeated; tokens/s relative to the HF arm."""
    base = {k: setting[k] for k in ("preset", "seq", "batch", "warmup", "steps")}
    flops = encoder_flops_per_token(_sizes(setting["preset"]), setting["seq"])
    results: dict[str, Any] = {}
    for data_name, store in stores.items():
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
        for _ in range(setting["repeats"]):  # interleaved: noise hits every arm alike
            for name, arm in arms.items():
                t0 = time.perf_counter()
                runs[name].append(run_arm({**base, **arm, "store": str(store)}, threads))
                r = runs[name][-1]
                # one line per arm as it ends: a run cut short (a lent GPU's time limit) keeps what it measured
                print(
                    f"  {name}: {r['tokens_per_step'] / min(r['step_times_s']):,.0f} tokens/s (fastest step "
                    f"{min(r['step_times_s']) * 1e3:.1f} ms, median {statistics.median(r['step_times_s']) * 1e3:.1f} ms"
                    + (f", peak GPU {r['peak_gpu_mb']:,.0f} MB" if r.get("peak_gpu_mb") else "")
                    + f"; {time.perf_counter() - t0:.0f} s with start-up)",
                    flush=True,
                )
        table = {}
        for name, rs in runs.items():
            times = [t for r in rs for t in r["step_times_s"]]
            tps = rs[0]["tokens_per_step"] / min(times)
            gpu_mb = [r["peak_gpu_mb"] for r in rs if r.get("peak_gpu_mb") is not None]
            table[name] = {
                "tokens_per_s": tps,
                "median_tokens_per_s": rs[0]["tokens_per_step"] / statistics.median(times),
                "step_s": min(times),
                "step_times_s": times,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                "training_rss_mb": max(r["peak_rss_mb"] - r["rss_before_training_mb"] for r in rs),
                "peak_gpu_mb": max(gpu_mb) if gpu_mb else None,
                "mfu": tps * flops / (peak * 1e9),
                "parameters": rs[0]["parameters"],
            }
        hf = table[HF_ARM]["tokens_per_s"]
        hf_median = table[HF_ARM]["median_tokens_per_s"]
        for row in table.values():
            row["vs_hf"] = row["tokens_per_s"] / hf
            row["vs_hf_median"] = row["median_tokens_per_s"] / hf_median
        results[data_name] = table
        vocab = json.loads((store / "manifest.json").read_text())["tokenizer"]["vocab_size"]
        print(f"\n[{data_name} tokens, vocab {vocab}]")
        memory = "peak GPU" if any(row["peak_gpu_mb"] for row in table.values()) else "train RSS"
        print(
            f"{'arm':34s} {'tokens/s':>10s} {'vs HF':>7s} {'(median)':>9s} {'MFU':>6s} {'peak RSS':>9s} {memory:>9s}"
        )
        for name, row in table.items():
            mem = row["peak_gpu_mb"] if row["peak_gpu_mb"] else row["training_rss_mb"]
            print(
                f"{name:34s} {row['tokens_per_s']:10.0f} {row['vs_hf']:6.2f}x {row['vs_hf_median']:8.2f}x "
                f"{row['mfu']:6.1%} {row['peak_rss_mb']:7.0f}MB {mem:7.0f}MB",
                flush=True,
            )
    return results


def mae_saving(
    base: dict[str, Any], store: Path, ratios: list[float], threads: int, **extra: Any
) -> dict[str, Any]:
    """MAE against MLM corruption at each ratio (biomask ZeRO-0, char tokens): the fraction of the MLM
    step time MAE saves."""
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
                "store": str(store),
                "ratio": ratio,
                "corruption": corruption,
                **extra,
            }
            r = run_arm(spec, threads)
            row[corruption] = r["tokens_per_step"] / min(r["step_times_s"])
        row["saving"] = 1 - row["mlm"] / row["mae"]  # fraction of the MLM step time saved
        mae[f"{ratio:g}"] = row
        print(f"{ratio:6.2f} {row['mlm']:10.0f} {row['mae']:10.0f} {row['saving']:6.1%}", flush=True)
    return mae


def cpu_section(args: argparse.Namespace) -> dict[str, Any]:
    """fp32 on the CPU: tokens/s against HF, MFU, and the MAE saving as the ratio grows."""
    setting = dict(QUICK if args.quick else FULL)
    if args.repeats:
        setting["repeats"] = args.repeats
    sizes = _sizes(setting["preset"])
    print(
        f"bench_pretrain (CPU, fp32): preset {setting['preset']} {sizes}, seq {setting['seq']}, "
        f"batch {setting['batch']}, {args.threads} thread(s), {setting['steps']} steps x {setting['repeats']} repeat(s)",
        flush=True,
    )
    stores = prepare_stores(args.quick, args.tokens)
    peak = max(run_arm({"kind": "peak", "quick": args.quick}, args.threads)["gflops"] for _ in range(2))
    print(f"measured fp32 matmul peak: {peak:.1f} GFLOP/s on {args.threads} thread(s)", flush=True)
    arms = compared_arms()
    if args.quick:
        arms.pop(ZERO2_ARM)
    results: dict[str, Any] = {
        "setting": setting,
        "sizes": sizes,
        "peak_gflops": peak,
        "threads": args.threads,
        **compare(stores, setting, arms, peak, args.threads),
    }
    # The other CPU-sized preset, at the same length and batch. The last-block saving is about
    # 1/depth, so the 2-layer `tiny` gains more than the 4-layer `small` above (the headline).
    others: dict[str, Any] = {}
    for preset in [] if args.quick else ["tiny"]:
        other = {**setting, "preset": preset}
        print(
            f"\n--- preset {preset} {_sizes(preset)}, seq {other['seq']}, batch {other['batch']}", flush=True
        )
        others[preset] = {"sizes": _sizes(preset), **compare(stores, other, arms, peak, args.threads)}
    results["other_presets"] = others

    # MAE: masked tokens leave the encoder input, so its cost falls as the ratio rises.
    base = {k: setting[k] for k in ("preset", "seq", "batch", "warmup", "steps")}
    ratios = ([0.15, 0.75] if args.quick else [0.15, 0.3, 0.5, 0.75]) if "char" in stores else []
    mae = mae_saving(base, stores["char"], ratios, args.threads) if ratios else {}
    results["mae"] = mae
    return results


def gpu_section(args: argparse.Namespace) -> dict[str, Any]:
    """bf16 on one GPU (`base` preset): tokens/s against HF with autocast, MFU against the measured
    bf16 matmul peak, peak GPU memory."""
    setting = dict(GPU)
    if args.quick:
        setting.update(preset="small", steps=10, repeats=1)
    if args.repeats:
        setting["repeats"] = args.repeats
    threads = max(args.threads, min(8, os.cpu_count() or 1))  # host side: collation, launches
    gpu = {"device": "cuda", "precision": "bf16"}
    peak_run = max((run_arm({"kind": "peak", **gpu}, threads) for _ in range(2)), key=lambda r: r["gflops"])
    peak = peak_run["gflops"]
    print(
        f"\nbench_pretrain (GPU, bf16): {peak_run['device_name']}, preset {setting['preset']} "
        f"{_sizes(setting['preset'])}, seq {setting['seq']}, batch {setting['batch']}; "
        f"measured bf16 matmul peak {peak / 1000:.0f} TFLOP/s",
        flush=True,
    )
    stores = prepare_stores(False, args.tokens)
    plain = compared_arms(**gpu)
    # The headline pair first (a lent GPU's time may end the run early), then what each lever buys
    # (train.compile, optim.fused), the peer with the same compiler, and ZeRO-2.
    arms = {
        HF_ARM: plain[HF_ARM],
        ZERO0_ARM: plain[ZERO0_ARM],
        "biomask ZeRO-0 + compile": {**plain[ZERO0_ARM], "compile": True},
        "hf + torch.compile": {**plain[HF_ARM], "compile": True},
        ZERO2_ARM: plain[ZERO2_ARM],
        "biomask ZeRO-0, unfused AdamW": {**plain[ZERO0_ARM], "fused": False},
    }
    # (DeepSpeed's own bf16 mode, train.precision=bf16-weights, was 0.68x HF here: README "Throughput")
    results = {
        "setting": setting,
        "sizes": _sizes(setting["preset"]),
        "peak_gflops": peak,
        "device_name": peak_run["device_name"],
        **compare(stores, setting, arms, peak, threads),
    }
    if "char" in stores:  # MAE corruption's saving at a high ratio, as on CPU
        base = {k: setting[k] for k in ("preset", "seq", "batch", "warmup", "steps")}
        results["mae"] = mae_saving(base, stores["char"], [0.75], threads, **gpu)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny preset, short sequences, one repeat (~1-2 min)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads per CPU arm (default 1: a shared machine)"
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--tokens",
        nargs="+",
        choices=["char", "bpe4096"],
        default=["char", "bpe4096"],
        help="which token stores",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="cpu: the fp32 CPU section; cuda: the bf16 GPU section; auto (default): CPU, and GPU where there is one",
    )
    parser.add_argument("--out", help="also write the results here (always: bench-results/pretrain.json)")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.arm:  # child process: run one arm, print its JSON
        spec = json.loads(args.arm)
        print(json.dumps(ARMS[spec["kind"]](spec)))
        return 0

    has_gpu = cuda_available()
    if args.device == "cuda" and not has_gpu:
        print("bench_pretrain: --device cuda, but torch sees no GPU", file=sys.stderr)
        return 2
    load_start = os.getloadavg()[0]
    results: dict[str, Any] = {"threads": args.threads, "quick": args.quick}
    if args.device in ("auto", "cpu"):
        results.update(cpu_section(args))  # the CPU results stay at the top level, as before
    if args.device == "cuda" or (args.device == "auto" and has_gpu):
        results["gpu"] = gpu_section(args)
    results["load_average_start_end"] = [load_start, os.getloadavg()[0]]
    name = "pretrain" if args.device != "cuda" else "pretrain-gpu"
    path = save_result(name, results)
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
