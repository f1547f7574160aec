# Helpers of the benchmark and paper rules (benchmarks.smk, paper.smk): where each benchmark
# writes, and its options from config["benchmarks"] as a command line.
import shlex

BENCH_SCRIPTS = os.path.join(workflow.basedir, "benchmarks")
BENCH_DIR = "results/benchmarks"
# More threads than any machine has: Snakemake caps a local job's threads at --cores, so a
# benchmark runs alone (workflow.cores is undefined under a cluster executor, where the
# profile's cpus_per_task sets the job's CPUs).
BENCH_THREADS = 1024


def bench_options(size, name):
    """config["benchmarks"][size][name] as command-line options of bench_<name>.py."""
    options = config["benchmarks"][size].get(name)
    if options is None:
        raise ValueError(
            f"config benchmarks.{size}.{name} is missing: add the options of "
            f"benchmarks/bench_{name}.py there (an empty mapping {{}} for the defaults)"
        )
    words = []
    for key, value in options.items():
        values = value if isinstance(value, list) else [value]
        words += [f"--{key.replace('_', '-')}", *map(str, values)]
    return " ".join(shlex.quote(w) for w in words)


def bench_shell(name):
    """The command of one benchmark rule: the script writes <result>.json into the size's folder."""
    script = os.path.join(BENCH_SCRIPTS, f"bench_{name}.py")
    return (
        f"BENCH_RESULTS_DIR={BENCH_DIR}/{{wildcards.size}} python {shlex.quote(script)}"
        f" {{params.options}} > {{log}} 2>&1"
    )


def bench_results(size):
    """Every benchmark JSON of `size` that its config block asks for."""
    names = [n for n in config["benchmarks"][size] if n != "dchag_memory"]
    files = [f"{BENCH_DIR}/{size}/{n}.json" for n in names]
    if "dchag_memory" in config["benchmarks"][size]:
        files += [
            f"{BENCH_DIR}/{size}/dchag_memory_{v}.json"
            for v in config["benchmarks"]["dchag_variants"]
        ]
    return files


def scaling_inputs(wildcards):
    """The scaling figure's inputs: the demo benchmarks plus whatever JSON the folder it reads
    holds, once each (the two overlap when that folder is the demo benchmarks' own), so the
    input set is the same before and after the benchmarks ran."""
    return sorted(set(bench_results("demo")) | set(benchmark_results(wildcards)))
