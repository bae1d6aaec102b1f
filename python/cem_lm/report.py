"""The grid's report: results.json (every run), table.md (the comparison), data_manifest.json
and plots (val curves per variant, test bpb per variant)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .plots import plot_test_bpb, plot_val_curves
from .variants import Variant


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(variants: list[Variant], records: list[dict]) -> dict[str, dict]:
    by_variant = {v.name: sorted((r for r in records if r["variant"] == v.name), key=lambda r: r["seed"])
                  for v in variants}
    summary = {}
    for v in variants:
        runs = by_variant[v.name]
        if not runs:
            continue
        bpb = [r["test_bpb"] for r in runs]
        entry = {
            "description": v.description,
            "overrides": v.overrides,
            "compare_to": v.compare_to,
            "seeds": [r["seed"] for r in runs],
            "params": runs[0]["params"],
            "test_bpb": bpb,
            "test_bpb_mean_std": mean_std(bpb),
            "tokens_per_second_mean_std": mean_std([r["tokens_per_second"] for r in runs]),
            # Other work on the machine only ever slows a run down: the best run is the cleanest figure.
            "tokens_per_second_best": max(r["tokens_per_second"] for r in runs),
        }
        ref = by_variant.get(v.compare_to) or []
        ref_by_seed = {r["seed"]: r["test_bpb"] for r in ref}
        paired = [r["test_bpb"] - ref_by_seed[r["seed"]] for r in runs if r["seed"] in ref_by_seed]
        if paired:
            # Same seed -> same batches in the same order: the paired difference removes data noise.
            entry["delta_vs_compare_to"] = paired
            entry["delta_vs_compare_to_mean_std"] = mean_std(paired)
        summary[v.name] = entry
    return summary


def val_curves(variants: list[Variant], records: list[dict], group: str | None = None) -> dict:
    curves = {}
    for v in variants:
        runs = [r for r in records if r["variant"] == v.name]
        if not runs or (group is not None and v.group != group and v.name not in ("llama", "llama_alibi")):
            continue
        steps = runs[0]["history"]["val_step"]
        columns = list(zip(*(r["history"]["val_bpb"] for r in runs)))
        stats = [mean_std(list(c)) for c in columns]
        curves[v.name] = (steps, [m for m, _ in stats], [s for _, s in stats])
    return curves


def spread(std: float, count: int) -> str:
    """' ± std', or a note where one value has no spread."""
    return f" ± {std:.4f}" if count > 1 else " (one seed)"


def markdown_table(summary: dict[str, dict]) -> str:
    lines = [
        "| variant | what | total params | attention params | MLP params | test bpb (mean ± std) | "
        "Δ bpb vs (paired, mean ± std) | tokens/s best (mean) |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, e in summary.items():
        mean, std = e["test_bpb_mean_std"]
        delta = "–"
        if "delta_vs_compare_to_mean_std" in e:
            d_mean, d_std = e["delta_vs_compare_to_mean_std"]
            delta = f"{d_mean:+.4f}{spread(d_std, len(e['delta_vs_compare_to']))} vs {e['compare_to']}"
        p = e["params"]
        lines.append(
            f"| {name} | {e['description']} | {p['total']:,} | {p['attention']:,} | {p['mlp']:,} | "
            f"{mean:.4f}{spread(std, len(e['test_bpb']))} | {delta} | {e['tokens_per_second_best']:,.0f} "
            f"({e['tokens_per_second_mean_std'][0]:,.0f}) |"
        )
    return "\n".join(lines)


def backends_text(env: dict) -> str:
    """e.g. "reference" or "attention_fwd cuda, ..." for the device the grid ran on."""
    key = "CUDA" if env["device"].startswith("cuda") else "CPU"
    chosen = {op: devices.get(key, "?") for op, devices in env.get("cem_ops_backends", {}).items()}
    if not chosen:
        return "unknown"
    if len(set(chosen.values())) == 1:
        return f"{next(iter(chosen.values()))} for every op"
    return ", ".join(f"{op} {backend}" for op, backend in chosen.items())


def gpu_name(gpu) -> str:
    """The GPU's name and clocks (cem_ops.machine.gpu_identity), or the bare name of older results."""
    if not isinstance(gpu, dict):
        return str(gpu)
    clocks = f", SM {gpu['sm_clock_mhz']}/{gpu['sm_clock_max_mhz']} MHz, driver {gpu['driver']}" if "driver" in gpu else ""
    return f"{gpu['name']}{clocks}"


def environment_text(env: dict, preset: str, records: list[dict]) -> str:
    first = records[0]
    mc, tc = first["model_config"], first["train_config"]
    git = env["git"]
    return "\n".join([
        f"- Date: {env['date_utc']}; wall time {env['wall_seconds'] / 60:.1f} min for {len(records)} runs "
        f"({env['jobs']} at a time, {env['threads_per_run']} torch thread(s) each).",
        f"- Machine: {env['cpu']} ({env['cpu_count']} cores visible), device {env['device']}"
        + (f" ({gpu_name(env['gpu'])}, CUDA {env['cuda']})" if "gpu" in env else "")
        + f"; load average at start {env['load_average_at_start']}, at end {env['load_average_at_end']}.",
        f"- Software: torch {env['torch']}, Python {env['python']}; source {git['sha']}"
        + (" (with uncommitted changes)" if git["dirty"] else "") + f"; cem_ops kernels: {backends_text(env)}.",
        f"- Preset `{preset}`: D={mc['dim']}, L={mc['layers']}, H={mc['heads']}, N={mc['seq_len']}; "
        f"{tc['steps']} steps x batch {tc['batch_size']} x {mc['seq_len']} = {first['tokens_trained']:,} training "
        f"tokens per run (every variant alike); AdamW lr {tc['lr']} (warmup {tc['warmup_steps']}, cosine to "
        f"{tc['min_lr_ratio']} x), weight decay {tc['weight_decay']}, clip {tc['grad_clip']}, {first['precision']}.",
        f"- Test: {first['test_tokens']:,} bytes of the held-out files (fixed windows, same for every run); "
        f"val curves: {tc['eval_batches'] * tc['batch_size']} windows every {tc['eval_every']} steps.",
        f"- Data: {first['data']['corpus']}, Python {first['data']['python_version']}; split SHA-256: "
        + ", ".join(f"{s} {i['sha256'][:16]}… ({i['bytes']:,} B)" for s, i in first["data"]["splits"].items())
        + " (full list in data_manifest.json).",
        f"- Throughput (tokens/s) times the training step only (no eval), on {env['device']}, on a machine that "
        "may be shared (see the load averages): the best run over seeds is the least disturbed figure; compare "
        "it within this table, not across machines.",
    ]) + "\n"


CAVEATS = """\
## What runs like these can and cannot show

- They are small next to the paper's (86M-256M parameters on SlimPajama): here {params} parameters
  see {tokens} bytes of Python source per run, {steps} steps. A difference here says which variant
  learns faster over these steps at this size, not which is better at scale or at convergence;
  the paper's findings are neither confirmed nor refuted by it.
- The embedding and head are a large share of the parameters at small D, so "total params" moves
  less than the attention or MLP column.
- One learning rate for every variant, not tuned per variant (the paper reports that full CEM
  models may prefer higher learning rates).
- With {seeds} seeds, a mean difference smaller than about two standard deviations (of the paired Δ)
  is not evidence either way.
- The corpus is Python source code, not web text.
- Tokens/s compares the cem_ops implementation of this build (see `cem_ops.kernel_backends()`;
  the reference PyTorch path when no fused kernel is compiled) with PyTorch's SDPA and linear
  layers for Llama, on whatever else the machine was running; it says nothing about fused kernels.
"""


def compact_run(record: dict) -> dict:
    """A run without its data summary (kept once at the top) and with curves rounded to 5 digits:
    the per-step curves of a whole grid would otherwise make a megabyte of JSON."""
    run = {k: v for k, v in record.items() if k != "data"}
    run["history"] = {k: [round(x, 5) for x in v] if k.endswith("bpb") else v
                      for k, v in record["history"].items() if k != "lr"}
    return run


def params_range(summary: dict[str, dict]) -> str:
    totals = [e["params"]["total"] for e in summary.values()]
    return f"{min(totals):,}-{max(totals):,}" if min(totals) != max(totals) else f"{totals[0]:,}"


def write_report(results_dir: Path, preset: str, variants: list[Variant], records: list[dict], env: dict,
                 manifest: dict | None):
    """Writes results.json (every run; data without file lists), table.md and plots; with a manifest,
    also data_manifest.json (the file lists)."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(variants, records)
    data_summary = records[0]["data"]
    if manifest is not None:
        (results_dir / "data_manifest.json").write_text(json.dumps(manifest, indent=1))
    runs = [compact_run(r) for r in records]
    data = {"preset": preset, "environment": env, "data": data_summary, "summary": summary, "runs": runs}
    (results_dir / "results.json").write_text(json.dumps(data, indent=1))

    title = f"preset {preset}, {env['device']}"
    panels = {g: val_curves(variants, records, g) for g in dict.fromkeys(v.group for v in variants)}
    plot_val_curves(panels, results_dir / "val_curves.png", f"Validation loss ({title}, mean ± std over seeds)")
    rows = [(name, *e["test_bpb_mean_std"]) for name, e in summary.items()]
    plot_test_bpb(rows, results_dir / "test_bpb.png", f"Test bits per byte ({title})")

    text = [
        f"# CEM vs Llama comparison grid, preset `{preset}`",
        "",
        "Generated by `python/run_experiments.py`; every number below comes from the runs in results.json.",
        "",
        "## How and where it ran",
        "",
        environment_text(env, preset, records),
        "## Results",
        "",
        "Lower bits per byte (bpb) is better. Δ is the difference to the named variant, computed per seed "
        "(the same seed gives every variant the same batches) and then averaged. Total params include the byte "
        "embedding and the head.",
        "",
        markdown_table(summary),
        "",
        "Plots: `val_curves.png` (validation bpb during training), `test_bpb.png` (final test bpb).",
        "",
        CAVEATS.format(params=params_range(summary), tokens=f"{records[0]['tokens_trained']:,}",
                       steps=records[0]["step"], seeds=len({r["seed"] for r in records})),
    ]
    (results_dir / "table.md").write_text("\n".join(text))
    return summary


def rewrite_report(results_dir: Path, variants: list[Variant]):
    """Rebuild table.md and the plots from an existing results.json (its environment kept as recorded)."""
    data = json.loads((Path(results_dir) / "results.json").read_text())
    records = [{**r, "data": data["data"]} for r in data["runs"]]
    names = {r["variant"] for r in records}
    return write_report(results_dir, data["preset"], [v for v in variants if v.name in names], records,
                        data["environment"], None)
