"""Turns a pytest-benchmark JSON of test_attention_speed.py into a Markdown table and a PNG plot.

    python benchmarks/report.py benchmarks/results/<name>.json   # writes <name>.md and <name>.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load(path: Path) -> tuple[dict, list[dict]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"report.py: {path} is not a readable pytest-benchmark JSON ({error})") from None
    if "benchmarks" not in data:
        raise SystemExit(f"report.py: {path} has no 'benchmarks' list: not a pytest-benchmark JSON")
    rows = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        median = bench["stats"]["median"]
        if not info:
            continue
        rows.append({
            **info,
            "median_ms": median * 1e3,
            "q1_ms": bench["stats"]["q1"] * 1e3,
            "q3_ms": bench["stats"]["q3"] * 1e3,
            "tflops": info["flops"] / median / 1e12,
            "gbps": info["min_bytes"] / median / 1e9,
        })
    return data.get("machine_info", {}), rows


def yardstick_key(row: dict) -> tuple:
    return (row["mode"], row["model"], row["seq"])


def ceilings(rows: list[dict]) -> str:
    lines = ["| ceiling | median ms | TFLOP/s | GB/s |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['median_ms']:.3f} | {r['tflops']:.4g} | {r['gbps']:.4g} |")
    return "\n".join(lines) + "\n\n"


STOCK = ("stock", "stock_compiled")


def best_stock(impls: dict) -> dict | None:
    """The faster of eager and compiled stock PyTorch: the yardstick a user would pick."""
    measured = [impls[name] for name in STOCK if name in impls]
    return min(measured, key=lambda r: r["median_ms"]) if measured else None


def matmul_rate(ceiling_rows: list[dict]) -> float | None:
    """TFLOP/s of the dense matmul ceiling measured in the same run, or None without one."""
    rates = [r["tflops"] for r in ceiling_rows if r["what"].startswith("matmul")]
    return rates[0] if rates else None


def table(rows: list[dict], matmul_tflops: float | None = None) -> str:
    """One row per (mode, config, impl); "of matmul" is the useful TFLOP/s as a share of the
    matmul ceiling measured in the same run (blank without one)."""
    llama = {yardstick_key(r): r for r in rows if r["impl"] == "llama"}
    by_config = defaultdict(dict)
    for r in rows:
        if r["impl"] != "llama":
            by_config[(r["mode"], r["config"])][r["impl"]] = r
    lines = [
        "| mode | config | impl | median ms (q1-q3) | TFLOP/s | of matmul | GB/s (min bytes) | peak MiB "
        "| vs reference | vs best stock | vs llama (time, memory) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def of_matmul(r: dict) -> str:
        return f"{r['tflops'] / matmul_tflops:.0%}" if matmul_tflops else ""

    def order(item):
        (mode, _), impls = item
        r = next(iter(impls.values()))
        return (mode, r["model"], r["seq"], r["steps"], r["diag"])

    for (mode, config), impls in sorted(by_config.items(), key=order):
        any_row = next(iter(impls.values()))
        yard = llama.get(yardstick_key(any_row))
        stock = best_stock(impls)
        for name in ("reference", *STOCK, "ours"):
            r = impls.get(name)
            if r is None:
                continue
            peak = "" if r.get("peak_memory_bytes") is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
            ratios = []
            for other in (impls.get("reference"), stock):
                ratios.append(f"{other['median_ms'] / r['median_ms']:.2f}x faster" if other and name == "ours" else "")
            if name == "ours" and stock:
                ratios[1] += f" ({stock['impl']})"
            vs_llama = ""
            if yard and name == "ours":
                vs_llama = f"{r['median_ms'] / yard['median_ms']:.2f}x time"
                if r.get("peak_memory_bytes") and yard.get("peak_memory_bytes"):
                    vs_llama += f", {r['peak_memory_bytes'] / yard['peak_memory_bytes']:.2f}x memory"
            lines.append(
                f"| {mode} | {config} | {name} ({r['backend']}) "
                f"| {r['median_ms']:.3f} ({r['q1_ms']:.3f}-{r['q3_ms']:.3f}) | {r['tflops']:.4g} | {of_matmul(r)} "
                f"| {r['gbps']:.4g} "
                f"| {peak} | {ratios[0]} | {ratios[1]} | {vs_llama} |"
            )
        if yard:
            peak = "" if yard.get("peak_memory_bytes") is None else f"{yard['peak_memory_bytes'] / 2**20:.0f}"
            lines.append(f"| {mode} | {config} | llama (yardstick) | {yard['median_ms']:.3f} | {yard['tflops']:.4g} "
                         f"| {of_matmul(yard)} | {yard['gbps']:.4g} | {peak} | | | |")
    return "\n".join(lines)


IMPL_COLORS = {"reference": "tab:gray", "stock": "tab:orange", "stock_compiled": "tab:red", "llama": "tab:green",
               "ours": "tab:blue"}


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return False
    panels = sorted({(r["mode"], r["model"]) for r in rows})
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    for ax, (mode, model) in zip(axes[0], panels):
        series = defaultdict(list)
        for r in rows:
            if (r["mode"], r["model"]) == (mode, model):
                variant = None if r["impl"] == "llama" else (r["steps"], r["diag"])
                series[(r["impl"], variant)].append((r["seq"], r["tflops"]))
        # One colour per implementation, one line style per (T, diagonal).
        variants = sorted({v for _, v in series if v is not None})
        styles = dict(zip(variants, ("-", "--", "-.", ":", (0, (1, 3)), (0, (5, 1)))))
        for (impl, variant), points in sorted(series.items(), key=lambda item: (item[0][0], item[0][1] or (0, ""))):
            points.sort()
            label = impl if variant is None else f"{impl} T{variant[0]} {variant[1]}"
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label,
                    color=IMPL_COLORS.get(impl), linestyle=styles.get(variant, "-"))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("useful TFLOP/s")
        ax.set_title(f"{mode}, {model}")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def machine_text(identity: dict) -> str:
    """The CPU model as text; a GPU's description (name, clocks, driver) as compact JSON."""
    device = identity.get("gpu") or identity.get("cpu")
    return device if isinstance(device, str) else f"`{json.dumps(device)}`"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    args = parser.parse_args()
    machine, all_rows = load(args.json)
    rows = [r for r in all_rows if r.get("kind") != "ceiling"]
    ceiling_rows = [r for r in all_rows if r.get("kind") == "ceiling"]
    identity = machine.get("cem_ops", {})
    header = [f"# CEM attention benchmark: {args.json.stem}", "",
              f"Machine: {machine_text(identity)}", "",
              f"torch {identity.get('torch')}, CUDA {identity.get('cuda')}, git {identity.get('git', {}).get('sha')}, "
              f"kernels {json.dumps(identity.get('cem_ops_build', {}).get('kernels', {}).get('attention_fwd'))}, "
              f"{identity.get('date_utc')}", "",
              "FLOP convention: see benchmarks/harness.py (useful FLOPs, causal half, diagonal terms included; "
              "forward+backward = 3x forward).", ""]
    md = args.json.with_suffix(".md")
    body = (ceilings(ceiling_rows) if ceiling_rows else "") + table(rows, matmul_rate(ceiling_rows))
    md.write_text("\n".join(header) + body + "\n")
    print(md.read_text())
    if plot(rows, args.json.with_suffix(".png")):
        print(f"wrote {args.json.with_suffix('.png')}")


if __name__ == "__main__":
    main()
