# Named targets: tiles, encoders, features, exp_<name> per experiment, study (= multiseed),
# figures, report (all: Snakefile: the default experiments, train.seeds).


rule tiles:
    input:
        tables=tile_tables,
        qc=tile_qc,
        overview=f"{RESULTS}/slides.tsv",


# every encoder pretraining writes (`snakemake --until pretrain` cannot see past the manifest
# checkpoint, so it trains nothing)
rule encoders:
    input:
        encoders,


# embeddings of every experiment in CLAM's and TRIDENT's per-magnification layout
rule features:
    input:
        exported_features,


# one target per experiment in config.yaml: adding an experiment adds its target
for _name in EXPERIMENTS:

    rule:
        name:
            f"exp_{_name}"
        input:
            f"{RESULTS}/{_name}/metrics.tsv",


# the study: every experiment (each ablation, tri, the benchmark checks) over study.seeds
rule study:
    input:
        f"{RESULTS}/multiseed/summary.tsv",


rule multiseed:
    input:
        rules.study.input,


rule figures:
    input:
        summary=f"{RESULTS}/summary.tsv",
        metrics=expand(
            f"{RESULTS}/{{experiment}}/metrics.tsv", experiment=DEFAULT_EXPERIMENTS
        ),
        pca=expand(
            f"{RESULTS}/{{experiment}}/seed{SEEDS[0]}/pca.parquet",
            experiment=DEFAULT_EXPERIMENTS,
        ),
        predictions=expand(
            f"{RESULTS}/{{experiment}}/seed{SEEDS[0]}/predictions.parquet",
            experiment=DEFAULT_EXPERIMENTS,
        ),
        delta_hier=expand(
            f"{RESULTS}/{{experiment}}/seed{SEEDS[0]}/delta_hier.parquet",
            experiment=DEFAULT_EXPERIMENTS,
        ),
        train_logs=lambda wildcards: list(train_logs(wildcards).values()),
        tables=tile_tables,
        qc=tile_qc,
        manifest=f"{RESULTS}/manifest.tsv",
    output:
        done=f"{RESULTS}/figures/figures.done",
        figures=report(
            directory(f"{RESULTS}/figures/png"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
    log:
        f"{RESULTS}/logs/figures.log",
    benchmark:
        f"{RESULTS}/benchmarks/figures/figures.tsv"
    conda:
        "../envs/core.yaml"
    resources:
        **rule_resources("figures"),
    params:
        experiments=DEFAULT_EXPERIMENTS,
        seed=SEEDS[0],
        train_logs=train_logs,
        mags=MAGS,
    script:
        "../workflow_scripts/figures.py"


rule benchmark_table:
    input:
        summary=f"{RESULTS}/summary.tsv",
    output:
        table=report(
            f"{RESULTS}/benchmarks/summary.tsv",
            caption="../report/benchmarks.rst",
            category="0. Summary",
        ),
    log:
        f"{RESULTS}/logs/benchmark_table.log",
    conda:
        "../envs/core.yaml"
    resources:
        **rule_resources("benchmark_table"),
    params:
        folder=lambda wildcards, output: str(Path(output.table).parent),
    script:
        "../workflow_scripts/benchmark_table.py"


# everything the report shows; then `snakemake --report results/report.html` writes it
# (Snakemake's own report, from the run's metadata: docs/cluster.md)
rule report:
    input:
        f"{RESULTS}/summary.tsv",
        f"{RESULTS}/slides.tsv",
        f"{RESULTS}/figures/figures.done",
        f"{RESULTS}/benchmarks/summary.tsv",
