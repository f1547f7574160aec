"""The papers' figures and tables from the benchmark rules' JSON (results/benchmarks/paper/).

    python benchmarks/paper_figures.py FIGURE --out results/paper/FIGURE.png INPUT...

Each figure writes PNG + PDF + a JSON of the numbers drawn (``<out>.json``), prints on it the
machine that produced the numbers, and draws published numbers (``published.PUBLISHED``) as
labelled reference marks apart from ours. Without usable data the figure says why instead of
being blank. ``table6`` writes the skill table in the layout of ORBIT-2's Table 6 (markdown +
CSV) from results/evaluation/metrics.csv.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from downscaler.evaluation.figures import _message_figure, _save  # noqa: E402
from downscaler.io import write_json  # noqa: E402
from perf_model import fit, speedup_curve  # noqa: E402
from published import PUBLISHED  # noqa: E402

REF_STYLE = {"color": "0.35", "ls": ":", "lw": 1.2}


def load(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def machine_label(docs: list[dict[str, Any]]) -> str:
    """'measured on <machine>, <date>' from the benchmark JSON (every figure prints it)."""
    labels = sorted({d.get("machine", {}).get("label", "unknown machine") for d in docs})
    dates = sorted(d.get("time_utc", "")[:10] for d in docs if d.get("time_utc"))
    peaks = [d["peak"]["flops_per_s"] for d in docs if isinstance(d.get("peak"), dict)]
    peak = f"; fp32 matmul peak {max(peaks) / 1e9:.0f} GFLOP/s" if peaks else ""
    return f"measured on {' / '.join(labels)}, {dates[-1] if dates else '?'}{peak}"


def finish(fig: plt.Figure, out: Path, docs: list[dict], data: Any) -> None:
    fig.text(0.01, -0.02, machine_label(docs), fontsize=7, ha="left", va="top", color="0.3")
    _save(fig, out)
    write_json(json.loads(json.dumps({"machine": machine_label(docs), "data": data},
                                     default=str)), out.with_suffix(".json"))


def empty(out: Path, title: str, reason: str, docs: list[dict] | None = None) -> None:
    """A figure that says why it has no data (and the JSON says the same)."""
    fig = _message_figure(title, ["No data to draw:", reason])
    finish(fig, out, docs or [], {"empty": reason})


def from_cases(title: str) -> Callable[[Callable], Callable[[Path, list[str]], None]]:
    """A figure drawn from the ``cases`` of one benchmark JSON: ``draw(doc, cases, title)``
    returns (figure, data drawn); without cases the figure says so instead."""
    def wrap(draw: Callable[[dict, pd.DataFrame, str], tuple[plt.Figure, Any]]):
        @functools.wraps(draw)
        def figure(out: Path, paths: list[str]) -> None:
            doc = load(paths[0])
            cases = pd.DataFrame(doc.get("cases", []))
            if cases.empty:
                return empty(out, title, f"{paths[0]} has no cases", [doc])
            fig, data = draw(doc, cases, title)
            finish(fig, out, [doc], data)
        return figure
    return wrap


@from_cases("Reslim vs upsample-first ViT: training step vs output resolution")
def reslim_vs_vit(doc: dict, cases: pd.DataFrame, title: str) -> tuple[plt.Figure, Any]:
    r = cases[cases.model == "reslim"].set_index(["mag", "coarse"])
    u = cases[cases.model == "upsample_vit"].set_index(["mag", "coarse"])
    ratio = pd.DataFrame({
        "speedup": u["step_s"] / r["step_s"],
        "memory_ratio": u["peak_bytes"] / r["peak_bytes"].clip(lower=1),
        "reslim_samples_per_s": r["samples_per_s"], "vit_samples_per_s": u["samples_per_s"],
        "reslim_peak_bytes": r["peak_bytes"], "vit_peak_bytes": u["peak_bytes"],
        "vit_tokens": u["tokens"], "reslim_tokens": r["tokens"],
    }).reset_index()  # fmt: skip
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for coarse, g in ratio.groupby("coarse"):
        a1.plot(g["mag"], g["reslim_samples_per_s"], "o-", label=f"Reslim, coarse {coarse}")
        a1.plot(g["mag"], g["vit_samples_per_s"], "s--", label=f"upsample ViT, coarse {coarse}")
        a2.plot(g["mag"], g["speedup"], "o-", label=f"speed-up (ours), coarse {coarse}")
        a2.plot(g["mag"], g["memory_ratio"], "s--", label=f"memory ratio (ours), coarse {coarse}")
        for m, s in zip(g["mag"], g["speedup"], strict=True):
            a2.annotate(f"{s:.1f}x", (m, s), textcoords="offset points", xytext=(4, 4))
    # the cost model fitted to these cases, extrapolated to larger inputs and magnifications
    coef = fit(cases)
    patch = int(round(cases["coarse"].iloc[0] / cases[cases.model == "reslim"]["tokens"].iloc[0]
                      ** 0.5))
    predicted = []
    for coarse in sorted({int(ratio["coarse"].max()), 32}):
        curve = speedup_curve(coef, coarse, patch, [4, 8, 16])
        predicted += curve
        a2.plot([c["mag"] for c in curve], [c["predicted_speedup"] for c in curve], ls="--",
                lw=1, label=f"predicted (cost model of this run), coarse {coarse}")
    ref = PUBLISHED["reslim_speedup"]
    a2.axhline(ref["value"], **REF_STYLE, label=ref["label"])
    for ax, where in ((a1, "best"), (a2, "upper left")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("magnification (output = coarse x mag)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc=where)
    a1.set_ylabel("training samples / s")
    a2.set_ylabel("upsample ViT / Reslim")
    a1.set_title("Throughput")
    a2.set_title("Speed-up and memory ratio (dotted: published)")
    fig.suptitle(title)
    return fig, {"measured": ratio.to_dict("records"),
                 "model": {"coefficients": coef, "patch": patch,
                           "equation": "t = a + b F + c L + d L^2"},
                 "predicted": predicted}


@from_cases("TILES: tiled vs untiled cost as the domain grows")
def tiles(doc: dict, cases: pd.DataFrame, title: str) -> tuple[plt.Figure, Any]:
    t = cases[cases["mode"] == "tiled"].set_index("area")
    u = cases[cases["mode"] == "untiled"].set_index("area")
    data = pd.DataFrame({"tiles": t["sequences"], "tiled_s": t["s_per_sample"],
                         "untiled_s": u["s_per_sample"],
                         "speedup": u["s_per_sample"] / t["s_per_sample"]}).reset_index()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    a1.loglog(data["area"], data["tiled_s"], "o-", label="tiled (ours)")
    a1.loglog(data["area"], data["untiled_s"], "s-", label="untiled (ours)")
    a1.loglog(data["area"], data["tiled_s"].iloc[0] * data["area"], "k--", lw=0.8,
              label="linear in area")
    a1.set_xlabel("domain area (x smallest)")
    a1.set_ylabel("fwd+bwd seconds per domain sample")
    a2.semilogx(data["area"], data["speedup"], "o-", label="untiled / tiled (ours)")
    for a, n, s in zip(data["area"], data["tiles"], data["speedup"], strict=True):
        a2.annotate(f"{n} tiles", (a, s), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ref = PUBLISHED["tiles_speedup"]
    a2.axhline(ref["low"], **REF_STYLE, label=ref["label"])
    a2.set_xlabel("domain area (x smallest)")
    a2.set_ylabel("speed-up of tiling")
    for ax in (a1, a2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig, data.to_dict("records")


def dchag(out: Path, paths: list[str]) -> None:
    docs = [load(p) for p in paths]
    title = "D-CHAG: peak memory per rank vs channels (tokenizer + aggregator, fwd+bwd)"
    rows, notes = [], []
    for doc in docs:
        variant = doc.get("args", {}).get("variant", "?")
        if doc.get("unsupported"):
            notes.append(f"{variant}: not measured ({doc['unsupported'][:90]})")
        for case in doc.get("cases", []):
            worst = max(r["peak_bytes"] for r in case["ranks"])
            mode = "none" if case["mode"] == "tp_no_dchag" else variant
            tp = 1 if mode == "none" else int(case["mode"].removeprefix("dchag_tp"))
            rows.append({"variant": mode, "tp": tp, "channels": case["channels"],
                         "peak_bytes_per_rank": worst})
    data = pd.DataFrame(rows).drop_duplicates(["variant", "tp", "channels"])
    if data.empty:
        return empty(out, title, "; ".join(notes) or "no D-CHAG cases in " + ", ".join(paths),
                     docs)
    fig, ax = plt.subplots(figsize=(8, 4.8), constrained_layout=True)
    for (variant, tp), g in data.groupby(["variant", "tp"]):
        label = "TP without D-CHAG (any tp)" if variant == "none" else f"D-CHAG-{variant}, tp={tp}"
        ax.plot(g["channels"], g["peak_bytes_per_rank"] / 2**20, "o-" if variant != "none"
                else "k-", label=label)
    base = data[data.variant == "none"].set_index("channels")["peak_bytes_per_rank"]
    if not base.empty:
        ref = PUBLISHED["dchag_saving"]
        ax.plot(base.index, base.values * (1 - ref["value"]) / 2**20, **REF_STYLE,
                label=ref["label"] + " (applied to our baseline)")
    data["saving_vs_none"] = [1 - r.peak_bytes_per_rank / base.get(r.channels, float("nan"))
                              for r in data.itertuples()]
    ax.set_xscale("log", base=2)
    ax.set_xlabel("input channels")
    ax.set_ylabel("peak memory per rank (MiB)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if notes:
        ax.set_title("\n".join(notes), fontsize=7)
    fig.suptitle(title)
    finish(fig, out, docs, data.to_dict("records"))


def sequence(out: Path, paths: list[str]) -> None:
    doc = load(paths[0])
    title = "Sequence length vs memory per rank and step time (Ulysses / LSS)"
    data = pd.DataFrame([{k: v for k, v in row.items() if not isinstance(v, (dict, list))}
                         for row in doc.get("rows", [])])
    xkey = next((k for k in ("tokens", "seq_len", "sequence_length") if k in data), None)
    if data.empty or xkey is None:
        return empty(out, title, "bench_sequence.py wrote no cases with a sequence length "
                     f"(columns: {sorted(data.columns)[:12]})", [doc])
    # bench_sequence.py's names first, then the generic ones
    ykeys = [next(k for k in keys if k in data) for keys in
             (("peak_bytes_per_rank", "peak_bytes"), ("step_time_s", "step_s"))
             if any(k in data for k in keys)]
    skey = next((k for k in ("config", "mode", "method", "variant", "sp") if k in data), None)
    fig, axes = plt.subplots(1, max(len(ykeys), 1), figsize=(11, 4.2), constrained_layout=True,
                             squeeze=False)
    ref = PUBLISHED["sequence_tokens"]
    for ax, y in zip(axes[0], ykeys, strict=False):
        for key, g in (data.groupby(skey) if skey else [("all", data)]):
            g = g.sort_values(xkey)
            ax.loglog(g[xkey], g[y], "o-", label=f"{key} (ours)")
        ax.set_xlabel(f"{xkey} per sequence")
        ax.set_ylabel(y)
        ax.grid(True, which="both", alpha=0.3)
        ax.annotate(ref["label"], (0.02, 0.02), xycoords="axes fraction", fontsize=6,
                    color=REF_STYLE["color"])
        ax.legend(fontsize=7)
    fig.suptitle(title)
    finish(fig, out, [doc], data.to_dict("records"))


def pipeline(out: Path, paths: list[str]) -> None:
    """Pipeline bubble vs micro-batches, one line per (schedule, stages), against the theory
    (p-1)/(m+p-1) drawn as dotted lines."""
    doc = load(paths[0])
    title = "Pipeline bubble vs micro-batches: measured (GPipe / 1F1B) and (p-1)/(m+p-1)"
    rows = pd.DataFrame([r for r in doc.get("rows", []) if "bubble" in r])
    if rows.empty:
        return empty(out, title, f"{paths[0]} has no measured rows", [doc])
    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    for i, (p, g) in enumerate(rows.groupby("stages")):
        m = sorted(g["microbatches"].unique())
        ax.plot(m, [(p - 1) / (k + p - 1) for k in m], color=f"C{i}", ls=":", lw=1.2,
                label=f"p={p} theory")
        for sched, marker in (("gpipe", "o-"), ("1f1b", "s--")):
            h = g[g["schedule"] == sched].sort_values("microbatches")
            if not h.empty:
                ax.plot(h["microbatches"], h["bubble"], marker, color=f"C{i}",
                        label=f"p={p} {sched} (ours)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batches m")
    ax.set_ylabel("bubble fraction of a step")
    ax.set_ylim(0, 1)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    finish(fig, out, [doc], rows.to_dict("records"))


@from_cases("Data-parallel training step: strong and weak scaling")
def scaling(doc: dict, cases: pd.DataFrame, title: str) -> tuple[plt.Figure, Any]:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for mode, g in cases.groupby("mode"):
        a1.plot(g["processes"], g["samples_per_s"], "o-", label=f"{mode} (ours)")
        a2.plot(g["processes"], 100 * g["efficiency"], "o-", label=f"{mode} (ours)")
    for key in ("batch_scaling", "strong_scaling"):
        ref = PUBLISHED[key]
        a2.axhline(100 * ref["value"], **REF_STYLE, label=ref["label"])
    a1.set_ylabel("samples / s (global)")
    a2.set_ylabel("parallel efficiency (%)")
    a2.axhline(100, color="k", lw=0.6)
    for ax in (a1, a2):
        ax.set_xlabel("processes")
        ax.set_xticks(sorted(cases["processes"].unique()))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig, cases.to_dict("records")


@from_cases("MFU of a training step (fwd+bwd+AdamW) against the matmul peak of the same run")
def mfu(doc: dict, cases: pd.DataFrame, title: str) -> tuple[plt.Figure, Any]:
    data = cases[["preset", "params", "flops_per_step", "step_s", "samples_per_s",
                  "tokens_per_s", "mfu"]]
    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    bars = ax.bar(data["preset"], 100 * data["mfu"], color="C0")
    for bar, row in zip(bars, data.itertuples(), strict=True):
        ax.annotate(f"{100 * row.mfu:.0f}%\n{row.samples_per_s:.3g} samples/s\n"
                    f"{row.tokens_per_s:.3g} tokens/s", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.axhline(30, ls="--", color="C3", lw=0.8, label="issue 15 target, demo model (30%)")
    ax.axhline(55, ls="--", color="C1", lw=0.8, label="issue 15 target, 9.5M (55%)")
    ax.set_ylim(0, 100)
    ax.set_ylabel("MFU (%)")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig, data.to_dict("records")


@from_cases("Inference: ms per sample vs batch (tile of the infer stage)")
def inference(doc: dict, cases: pd.DataFrame, title: str) -> tuple[plt.Figure, Any]:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    a1.loglog(cases["batch"], cases["ms_per_sample"], "o-", label="ours")
    ref = PUBLISHED["inference_ms"]
    a1.axhline(ref["value"], **REF_STYLE, label=ref["label"])
    a1.set_ylabel("ms / sample")
    a2.semilogx(cases["batch"], cases["peak_bytes"] / 2**20, "o-")
    a2.set_ylabel("peak memory (MiB)")
    for ax in (a1, a2):
        ax.set_xlabel("batch (tiles)")
        ax.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=7)
    fig.suptitle(f"{title}, preset {doc.get('args', {}).get('preset', '?')}")
    data = cases[["batch", "ms_per_sample", "samples_per_s", "peak_bytes"]]
    return fig, {"cases": data.to_dict("records"), **doc.get("summary", {})}


# (metric, header, format): the columns of ORBIT-2's Table 6, our names for them
TABLE6 = [("r2", "R^2", "{:.3f}"), ("pearson_r", "Pearson r (their \"R^2\")", "{:.3f}"),
          ("rmse", "RMSE", "{:.3f}"), ("rmse_q99.73", "RMSE > 99.7th pct", "{:.3f}"),
          ("ssim", "SSIM", "{:.3f}"), ("psnr", "PSNR", "{:.2f}")]


def table6(out: Path, paths: list[str]) -> None:
    """Skill table (model and baselines, per variable) in the layout of ORBIT-2's Table 6."""
    df = pd.read_csv(paths[0])
    wide = df.pivot_table(index=["variable", "method"], columns="metric", values="value")
    cols = [c for c in TABLE6 if c[0] in wide.columns]
    lines = ["| variable | method | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for (variable, method), row in wide.iterrows():
        cells = [fmt.format(row[m]) for m, _, fmt in cols]
        lines.append(f"| {variable} | {method} | " + " | ".join(cells) + " |")
    md = out.with_suffix(".md")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines) + "\n")
    wide[[m for m, _, _ in cols]].reset_index().to_csv(out.with_suffix(".csv"), index=False)


FIGURES: dict[str, Callable[[Path, list[str]], None]] = {
    "reslim_vs_vit": reslim_vs_vit, "tiles": tiles, "dchag_memory": dchag,
    "sequence": sequence, "pipeline": pipeline, "train_scaling": scaling, "mfu": mfu,
    "inference": inference, "table6": table6,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("figure", choices=sorted(FIGURES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("inputs", nargs="+")
    args = parser.parse_args(argv)
    FIGURES[args.figure](args.out, args.inputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
