"""The paper's figure rules: benchmark JSON with the fields every figure needs, each figure
(PNG + PDF + JSON) from tiny inputs, figures without data that say why, the Table 6 layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest

from tests.conftest import REPO

BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))
import paper_figures as P  # noqa: E402

MACHINE = {"label": "testhost: Test CPU (2 cores), torch 0", "hostname": "testhost"}
PEAK = {"matmul_n": 64, "dtype": "float32", "flops_per_s": 1e10}


def _doc(**payload) -> dict:
    return {"machine": MACHINE, "peak": PEAK, "time_utc": "2026-01-01T00:00:00Z",
            "versions": {"torch": "0"}, **payload}


def _write(path: Path, doc: dict) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def _check_figure(out: Path) -> dict:
    """PNG (not one colour) + PDF + JSON exist; the JSON names the machine."""
    png = out.with_suffix(".png")
    assert png.stat().st_size > 5_000
    assert out.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
    assert mpimg.imread(png)[..., :3].std() > 0.01
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["machine"].startswith("measured on ")
    return data


def _bench(script: str, out_dir: Path, *args: str) -> dict:
    env = {**os.environ, "BENCH_RESULTS_DIR": str(out_dir), "BENCH_PEAK_N": "128"}
    subprocess.run([sys.executable, str(BENCH / script), *args], env=env, check=True,
                   capture_output=True, timeout=300)
    return json.loads(next(out_dir.glob("*.json")).read_text())


def test_benchmark_json_has_machine_peak_date_versions(tmp_path):
    """A benchmark at its smallest size: the JSON carries what every figure prints."""
    doc = _bench("bench_tiles_scaling.py", tmp_path, "--tile", "4", "--halo", "2",
                 "--growth", "1", "2", "--repeats", "1", "--threads", "1")
    assert doc["benchmark"] == "tiles_scaling" and doc["time_utc"].endswith("Z")
    assert doc["peak"]["flops_per_s"] > 0 and doc["peak"]["matmul_n"] == 128
    assert {"torch", "numpy", "python", "git_commit"} <= set(doc["versions"])
    assert doc["machine"]["label"] and doc["machine"]["device"] == "cpu"
    assert [c["area"] for c in doc["cases"]] == [1, 1, 4, 4]
    assert all(c["samples_per_s"] > 0 and c["domain_pixels"] == c["side"] ** 2
               for c in doc["cases"])
    out = tmp_path / "paper" / "tiles.png"
    P.main(["tiles", "--out", str(out), str(tmp_path / "tiles_scaling.json")])
    data = _check_figure(out)
    assert [r["tiles"] for r in data["data"]] == [1, 4]  # tile count per area


def test_mfu_benchmark_and_figure(tmp_path):
    doc = _bench("bench_mfu.py", tmp_path, "--presets", "tiny", "--size", "8", "--batch", "1",
                 "--repeats", "1", "--matmul-n", "128")
    case = doc["cases"][0]
    # the MFU divides by the peak of this very run
    assert case["mfu"] == pytest.approx(case["achieved_flops_per_s"] / doc["peak"]["flops_per_s"])
    assert case["tokens_per_s"] == pytest.approx(case["samples_per_s"] * 16)  # (8/2)^2 tokens
    out = tmp_path / "mfu.png"
    P.main(["mfu", "--out", str(out), str(tmp_path / "mfu.json")])
    assert _check_figure(out)["data"][0]["preset"] == "tiny"


def _reslim_cases():
    cases = []
    for mag in (4, 8):
        for model, step in (("reslim", 0.1), ("upsample_vit", 0.1 * mag)):
            cases.append({"model": model, "mag": mag, "coarse": 8, "fine": 8 * mag,
                          "tokens": 16 * (mag**2 if model != "reslim" else 1), "step_s": step,
                          "samples_per_s": 2 / step, "peak_bytes": 1000 * step})
    return cases


def test_figures_from_each_benchmark_layout(tmp_path):
    """Every figure from JSON in its script's layout; the numbers drawn are in its JSON."""
    inputs = {
        "reslim_vs_vit": [_write(tmp_path / "r.json", _doc(cases=_reslim_cases()))],
        "train_scaling": [_write(tmp_path / "t.json", _doc(cases=[
            {"mode": m, "processes": n, "samples_per_s": 10.0 * n, "efficiency": e}
            for m in ("strong", "weak") for n, e in ((1, 1.0), (2, 0.8))]))],
        "inference": [_write(tmp_path / "i.json", _doc(args={"preset": "tiny"}, cases=[
            {"batch": b, "ms_per_sample": 5.0 / b, "samples_per_s": 200.0 * b,
             "peak_bytes": 2**20 * b} for b in (1, 4)], summary={"best_batch": 4}))],
        "dchag_memory": [
            _write(tmp_path / "d1.json", _doc(args={"variant": "linear"}, cases=[
                {"mode": "tp_no_dchag", "channels": c, "ranks": [{"peak_bytes": 8 * c}]}
                for c in (32, 64)] + [
                {"mode": "dchag_tp2", "channels": c, "ranks": [{"peak_bytes": 3 * c},
                                                               {"peak_bytes": 4 * c}]}
                for c in (32, 64)])),
            _write(tmp_path / "d2.json", _doc(args={"variant": "tree"}, cases=[],
                                              unsupported="unknown variant 'tree'")),
        ],
    }
    for name, paths in inputs.items():
        out = tmp_path / "paper" / f"{name}.png"
        P.main([name, "--out", str(out), *paths])
        data = _check_figure(out)["data"]
        if name == "reslim_vs_vit":
            assert [round(r["speedup"], 6) for r in data["measured"]] == [4.0, 8.0]
            assert {p["mag"] for p in data["predicted"]} == {4, 8, 16}
        if name == "dchag_memory":
            tp2 = [r for r in data if r["variant"] == "linear"]
            assert [r["peak_bytes_per_rank"] for r in tp2] == [128, 256]  # the largest rank
            assert tp2[0]["saving_vs_none"] == pytest.approx(0.5)
        if name == "inference":
            assert data["best_batch"] == 4


@pytest.mark.parametrize("name, doc, reason", [
    ("sequence", {"rows": []}, "wrote no cases"),
    ("dchag_memory", {"args": {"variant": "tree"}, "cases": [], "unsupported": "no tree"},
     "no tree"),
    ("train_scaling", {"cases": []}, "has no cases"),
])
def test_a_figure_without_data_says_why(tmp_path, name, doc, reason):
    out = tmp_path / f"{name}.png"
    P.main([name, "--out", str(out), _write(tmp_path / "in.json", _doc(**doc))])
    assert reason in _check_figure(out)["data"]["empty"]


def test_table6_layout(tmp_path):
    rows = [(m, v, k, x) for m in ("reslim", "bilinear") for v in ("t2m", "tp")
            for k, x in (("r2", 0.9), ("pearson_r", 0.95), ("rmse", 1.5), ("rmse_q99.73", 3.0),
                         ("ssim", 0.8), ("psnr", 30.0), ("bias", 0.1))]
    csv = tmp_path / "metrics.csv"
    pd.DataFrame(rows, columns=["method", "variable", "metric", "value"]).to_csv(csv, index=False)
    P.main(["table6", "--out", str(tmp_path / "table6.md"), str(csv)])
    lines = (tmp_path / "table6.md").read_text().splitlines()
    assert lines[0].startswith("| variable | method | R^2 | Pearson r")
    assert lines[0].rstrip().endswith("| PSNR |") and len(lines) == 2 + 4
    assert "| t2m | reslim | 0.900 | 0.950 | 1.500 | 3.000 | 0.800 | 30.00 |" in lines
    table = pd.read_csv(tmp_path / "table6.csv")
    assert "bias" not in table.columns and len(table) == 4


def test_paper_target_plans_every_figure(tmp_path):
    """`snakemake -n paper bench` schedules each benchmark rule and each figure of the paper."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "paper", "bench", "-n", "--quiet", "rules",
         "--directory", str(tmp_path), "-s", str(REPO / "Snakefile"),
         "--configfile", str(REPO / "config.yaml")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    for rule in ("bench_mfu", "bench_reslim_vs_baseline", "bench_tiles_scaling",
                 "bench_dchag_memory", "bench_train_scaling", "bench_inference",
                 "bench_sequence", "bench_pipeline", "bench_regrid", "bench_evaluate",
                 "paper_figure", "paper_table6"):
        assert rule in out, rule


def test_demo_scaling_figure_reads_the_benchmark_rules_layout(tmp_path):
    """The demo's scaling figure: tiles records on the domain axis, training records on the
    process axis (their args.size is no domain size), the machine taken from the JSON."""
    from downscaler.evaluate import write_scaling
    from downscaler.evaluation.benchmarks import load_benchmarks, machine_labels

    folder = tmp_path / "demo"
    folder.mkdir()
    _write(folder / "tiles_scaling.json", _doc(args={"tile": 8}, cases=[
        {"mode": m, "area": a, "side": 8 * a, "domain_pixels": 64 * a * a,
         "samples_per_s": 10.0 / a, "sequences": a * a} for m in ("tiled", "untiled")
        for a in (1, 2)]))
    _write(folder / "train_scaling.json", _doc(args={"size": 8, "batch": 2}, cases=[
        {"mode": "weak", "processes": n, "samples_per_s": 10.0 * n, "efficiency": 1.0}
        for n in (1, 2)]))
    df, problems = load_benchmarks(folder)
    assert not problems
    train = df[df["file"] == "train_scaling"]
    assert train["domain"].isna().all() and train["processes"].tolist() == [1, 2]
    tiles = df[df["file"] == "tiles_scaling"]
    assert tiles["domain"].tolist() == [64, 256, 64, 256] and tiles["processes"].isna().all()
    assert machine_labels(folder) == [MACHINE["label"]]
    png, pdf = write_scaling(str(folder), tmp_path / "scaling.csv", tmp_path / "scaling.png")
    assert png.stat().st_size > 20_000 and pdf.read_bytes().startswith(b"%PDF")


def test_sequence_figure_from_bench_sequence_layout(tmp_path):
    """bench_sequence.py's rows (config, tokens, peak_bytes_per_rank, step_time_s) are drawn."""
    rows = [{"config": c, "tokens": t, "peak_bytes_per_rank": t * k, "step_time_s": t / 1e3}
            for c, k in (("sp1", 4), ("ulysses_sp2", 2)) for t in (64, 256)]
    doc = _doc(rows=rows)
    out = tmp_path / "sequence.png"
    P.main(["sequence", "--out", str(out), _write(tmp_path / "sequence.json", doc)])
    data = _check_figure(out)["data"]
    assert len(data) == 4 and {r["config"] for r in data} == {"sp1", "ulysses_sp2"}


def test_pipeline_figure_from_bench_pipeline_layout(tmp_path):
    """bench_pipeline.py's rows (measured bubble per schedule, stages, micro-batches) are drawn;
    skipped combinations are left out."""
    rows = [{"schedule": s, "stages": p, "microbatches": m, "bubble": (p - 1) / (m + p - 1)
             + 0.03, "theory": (p - 1) / (m + p - 1)}
            for s in ("gpipe", "1f1b") for p in (2, 4) for m in (2, 4, 8)]
    rows.append({"schedule": "1f1b", "stages": 4, "microbatches": 1, "skipped": "m < p"})
    out = tmp_path / "pipeline.png"
    P.main(["pipeline", "--out", str(out), _write(tmp_path / "pipeline.json", _doc(rows=rows))])
    data = _check_figure(out)["data"]
    assert len(data) == 12 and {r["stages"] for r in data} == {2, 4}


def test_cost_model_recovers_known_coefficients():
    """Cases generated from t = a + bF + cL + dL^2 give back a, b, c, d (no noise)."""
    from perf_model import TERMS, fit, predict

    truth = dict(zip(TERMS, (0.01, 1e-7, 2e-5, 3e-8), strict=True))
    rows = [{"tokens": (8 * m // 2) ** 2 if vit else 16, "fine": 8 * m}
            for m in (4, 8, 16) for vit in (False, True)]
    cases = pd.DataFrame(rows)
    cases["step_s"] = predict(truth, cases["tokens"], cases["fine"] ** 2)
    got = fit(cases)
    for term in TERMS:
        assert got[term] == pytest.approx(truth[term], rel=1e-6)


def test_scaling_reader_takes_each_cases_process_count_not_the_scripts_option(tmp_path):
    from downscaler.evaluation.benchmarks import load_benchmarks

    doc = {"args": {"processes": [1, 2], "size": 16},
           "cases": [{"mode": "strong", "processes": 1, "samples_per_s": 10.0, "efficiency": 1.0},
                     {"mode": "strong", "processes": 2, "samples_per_s": 15.0,
                      "efficiency": 0.75}]}
    (tmp_path / "train_scaling.json").write_text(json.dumps(doc))
    df, problems = load_benchmarks(tmp_path)
    assert not problems
    assert df["processes"].tolist() == [1.0, 2.0]
    assert df["domain"].isna().all()
