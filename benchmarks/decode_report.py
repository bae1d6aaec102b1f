"""Turns pytest-benchmark JSONs of test_decode_speed.py into a Markdown table of decode steps.

    python benchmarks/decode_report.py benchmarks/results/cpu-decode.json > benchmarks/results/cpu-decode.md

On a shared machine, configurations that ran beside other processes (marked *) can be measured
again and the runs combined: each configuration shows its least disturbed measurement.

    python benchmarks/decode_report.py benchmarks/results/cpu-decode.json --rerun-filter   # prints a -k expression
    pytest benchmarks/test_decode_speed.py --bench-device cpu -k "<expression>" --benchmark-json <rerun>.json
    python benchmarks/decode_report.py benchmarks/results/cpu-decode.json <rerun>.json --out <name>.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from report import machine_text

# Above this share of the CPUs taken by other processes during a measurement, it is marked.
NOISY = 0.05
# Within one (batch, context): CEM variants first, then the Llama yardstick.
IMPL_ORDER = {"cem-T1": 0, "cem-T2": 1, "cem_shared-T2": 2, "llama": 3}


def load(path: Path) -> tuple[dict, list[dict]]:
    """(machine_info, rows): each benchmark's extra_info plus its median, rounds, name and file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"decode_report.py: {path} is not a readable pytest-benchmark JSON ({error})") from None
    if "benchmarks" not in data:
        raise SystemExit(f"decode_report.py: {path} has no 'benchmarks' list: not a pytest-benchmark JSON")
    rows = [{**bench["extra_info"], "median_s": bench["stats"]["median"], "rounds": bench["stats"]["rounds"],
             "name": bench["name"], "run": path.name}
            for bench in data["benchmarks"] if bench["extra_info"].get("kind") in ("decode", "ceiling")]
    return data.get("machine_info", {}), rows


def disturbance(row: dict) -> float:
    return row.get("others_cpu_share") or 0.0


def least_disturbed(rows: list[dict]) -> list[dict]:
    """One row per configuration (the copy ceiling included): the one others disturbed least,
    the earlier run on a tie."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["kind"], r.get("label"), r.get("batch"), r.get("context"))
        if key not in best or disturbance(r) < disturbance(best[key]):
            best[key] = r
    return list(best.values())


def noisy(row: dict) -> bool:
    return disturbance(row) > NOISY


def build_hash(machine: dict) -> str | None:
    return machine.get("cem_ops", {}).get("cem_ops_build", {}).get("source_hash")


def header(title: str, machines: list[dict], rows: list[dict], copy: dict | None, runs: list[Path]) -> list[str]:
    identity = machines[0].get("cem_ops", {})
    git = identity.get("git", {})
    backend = identity.get("cem_ops_build", {}).get("kernels", {}).get("attention_cached")
    first = rows[0]
    lines = [
        f"# Decode step benchmark: {title}", "",
        f"Machine: {machine_text(identity)}, {identity.get('cpu_count')} CPUs, {first['threads']} torch threads", "",
        f"torch {identity.get('torch')}, CUDA {identity.get('cuda')}, git {git.get('sha')}"
        f"{' (dirty)' if git.get('dirty') else ''}, build {build_hash(machines[0])}, "
        f"attention_cached kernels {json.dumps(backend)}, "
        f"{identity.get('date_utc')}", "",
        f"Model {first['model']}, ALiBi, {first['dtype']} on {first['device']}; CEM with T steps (label -T), "
        "Llama = LlamaAttention(position=alibi): SDPA over a KV cache. One decode step per call (one new token per "
        "row), median of the rounds shown; before each call the last-level cache is flushed (untimed) by reading "
        f"{first.get('flushed_cache_bytes', 0) / 2**20:.0f} MiB, so the step reads its cache from memory.", "",
        "Cache GB/s = the least bytes a step reads over its median time: CEM reads its cache once per step "
        "(T x B x context x bytes/token), Llama its keys and values once.", "",
    ]
    if copy:
        lines += [f"Copy bandwidth (1 GiB read + 1 GiB written, same session): "
                  f"{copy['bytes_moved'] / copy['median_s'] / 1e9:.1f} GB/s "
                  f"(other processes took {disturbance(copy):.0%} of the CPUs meanwhile).", ""]
    shares = [disturbance(r) for r in rows]
    waited = sum(r.get("waited_for_quiet_s", 0) for r in rows)
    lines += [f"Other processes took {min(shares):.0%} to {max(shares):.0%} of the CPUs while a configuration ran "
              f"(each first waited for them to go quiet, {waited:.0f} s in all); rows marked * shared the cores "
              f"with them for more than {NOISY:.0%} of the time and read slower than alone.", ""]
    if len(runs) > 1:
        counts = ", ".join(f"{run.name} ({sum(r['run'] == run.name for r in rows)} rows, build {build_hash(machine)})"
                           for run, machine in zip(runs, machines))
        lines += [f"Runs combined, each configuration's least disturbed measurement shown: {counts}.", ""]
    return lines


def table(rows: list[dict], copy: float | None) -> list[str]:
    lines = ["| impl | batch | context | median ms | tokens/s | cache GB/s | of copy | cache bytes/token/layer "
             "| time vs llama | rounds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    llama = {(r["batch"], r["context"]): r for r in rows if r["impl"] == "llama"}
    for r in sorted(rows, key=lambda r: (r["batch"], r["context"], IMPL_ORDER.get(r["label"], 9), r["label"])):
        rate = r["cache_bytes_read"] / r["median_s"]
        share = f"{rate / copy:.0%}" if copy else ""
        yard = llama.get((r["batch"], r["context"]))
        vs_llama = f"{r['median_s'] / yard['median_s']:.2f}x" if yard and r is not yard else ""
        lines.append(f"| {r['label']}{' *' if noisy(r) else ''} | {r['batch']} | {r['context']} "
                     f"| {r['median_s'] * 1e3:.3f} | {r['batch'] / r['median_s']:.4g} | {rate / 1e9:.3g} | {share} "
                     f"| {r['cache_bytes_per_token']} | {vs_llama} | {r['rounds']} |")
    return lines


def rerun_filter(rows: list[dict]) -> str:
    """A pytest -k expression selecting the marked configurations (the copy too, if marked)."""
    return " or ".join(r["name"] for r in rows if noisy(r))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="pytest-benchmark JSONs of test_decode_speed.py")
    parser.add_argument("--out", type=Path, help="write the Markdown here (default: standard output)")
    parser.add_argument("--rerun-filter", action="store_true",
                        help="print a pytest -k expression for the marked configurations instead of the table")
    args = parser.parse_args()
    loaded = [load(path) for path in args.runs]
    best = least_disturbed([r for _, rows in loaded for r in rows])
    devices = {r["device"] for r in best}
    if len(devices) > 1:
        raise SystemExit(f"decode_report.py: the runs measured different devices ({', '.join(sorted(devices))})")
    decode = [r for r in best if r["kind"] == "decode"]
    if not decode:
        raise SystemExit("decode_report.py: no decode-step benchmarks (test_decode_speed.py) in the runs")
    copy = next((r for r in best if r["kind"] == "ceiling"), None)
    if args.rerun_filter:
        print(rerun_filter(decode + ([copy] if copy else [])))
        return
    title = (args.out or args.runs[0]).stem
    rate = copy["bytes_moved"] / copy["median_s"] if copy else None
    machines = [machine for machine, _ in loaded]
    text = "\n".join(header(title, machines, decode, copy, args.runs) + table(decode, rate)) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
