"""`lte-ray bench quality`'s outputs: the markdown tables and the plot of its report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lte_ray.bench.report import machine_line, markdown_table


def _fmt(x: float, metric: str) -> str:
    return f"{x:.4f}" if "loss" in metric or "bits" in metric else f"{x:.3f}"


def markdown(report: dict[str, Any]) -> str:
    parts = [f"Machine: {machine_line(report['machine'])}.", ""]
    if report.get("set"):
        sets = ", ".join(f"`{s}`" for s in report["set"])
        parts += [f"Set for every setting, full-rank too (over the data sets' own values below): {sets}.", ""]
    for ds in report["datasets"]:
        metric = ds["metric"]
        n_evals = sum(n <= ds["budget_samples"] for n in ds["methods"][0]["curve"]["samples"]) if ds["methods"] else 0
        factor = report.get("budget_factor", 1)
        budget = f"Budget {ds['budget_samples']:,} samples per run" + (
            f" ({factor:g}x that for every setting but full-rank)" if factor > 1 else "")
        parts.append(f"**{ds['name']}**: {ds['about']}. {budget}, evaluated every "
                     f"{ds['budget_samples'] // max(1, n_evals):,} samples. Target: full-rank's final {metric}"
                     + (f" = {_fmt(ds['target'], metric)}" if ds["target"] is not None else " (full-rank not run)")
                     + ".")
        parts.append("")
        header = ["setting", "seeds", f"final {metric} (mean ± sd)"]
        extra = [k for k in (ds["methods"][0]["final"] if ds["methods"] else {}) if k != metric]
        header += [f"final {k}" for k in extra] + ["samples to target", "ratio to full-rank", "s per run"]
        rows = []
        for m in ds["methods"]:
            f = m["final"][metric]
            hit = f"{m['samples_to_target']:,}" if m["samples_to_target"] is not None else "not reached"
            ratio = f"{m['ratio_to_full']:.2f}" if m["ratio_to_full"] is not None else (
                f"> {m['curve']['samples'][-1] / ds['full_samples_to_target']:.2f}"
                if ds["full_samples_to_target"] else "-")
            rows.append([m["label"], len(m["seeds"]), f"{_fmt(f['mean'], metric)} ± {_fmt(f['std'], metric)}",
                         *[_fmt(m["final"][k]["mean"], k) for k in extra], hit, ratio,
                         f"{m['wall_seconds']['mean']:.0f}"])
        parts += [markdown_table(header, rows), ""]
    if report.get("skipped"):
        parts.append("Skipped: " + "; ".join(report["skipped"]) + ".")
    for f in report.get("failed", []):
        parts.append(f"FAILED: {f['dataset']} {f['setting']} seed {f['seed']}: {f['error']}")
    return "\n".join(parts).rstrip()


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = report["datasets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 4.5), squeeze=False)
    for ax, ds in zip(axes[0], sets):
        for m in ds["methods"]:
            c = m["curve"]
            (line,) = ax.plot(c["samples"], c["mean"], marker="o", markersize=3, label=m["label"])
            if len(m["seeds"]) > 1:
                ax.fill_between(c["samples"], c["min"], c["max"], color=line.get_color(), alpha=0.15)
        if ds["target"] is not None:
            ax.axhline(ds["target"], color="black", linestyle=":", linewidth=1, label="full-rank final")
        ax.set_title(ds["name"])
        ax.set_xlabel("samples seen")
        ax.set_ylabel(ds["metric"])
        if ds["mode"] == "max":
            ax.set_ylim(bottom=max(0.0, min(min(m["curve"]["mean"]) for m in ds["methods"]) - 0.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


