rule evaluate:
    input:
        embeddings=embeddings,
        tables=tile_tables,
        manifest=f"{RESULTS}/manifest.tsv",
    output:
        metrics=f"{RESULTS}/{{experiment}}/seed{{seed}}/metrics.tsv",
        summary=f"{RESULTS}/{{experiment}}/seed{{seed}}/metrics.json",
        predictions=f"{RESULTS}/{{experiment}}/seed{{seed}}/predictions.parquet",
        pca=f"{RESULTS}/{{experiment}}/seed{{seed}}/pca.parquet",
        delta_hier=f"{RESULTS}/{{experiment}}/seed{{seed}}/delta_hier.parquet",
    log:
        f"{RESULTS}/logs/evaluate/{{experiment}}_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{experiment}}_seed{{seed}}.tsv"
    conda:
        "../envs/core.yaml"
    threads: rule_threads("evaluate")
    resources:
        **rule_resources("evaluate"),
    params:
        mags=MAGS,
        evaluate=config["evaluate"],
        min_purity=config["tiling"]["min_purity"],
        seed=config["seed"],
    script:
        "../workflow_scripts/evaluate.py"


rule experiment_metrics:
    input:
        metrics=lambda wildcards: seed_metrics(wildcards.experiment, SEEDS),
        provenance=f"{RESULTS}/{{experiment}}/provenance.json",
    output:
        metrics=f"{RESULTS}/{{experiment}}/metrics.tsv",
        summary=f"{RESULTS}/{{experiment}}/metrics.json",
    log:
        f"{RESULTS}/logs/experiment_metrics/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/experiment_metrics/{{experiment}}.tsv"
    conda:
        "../envs/core.yaml"
    resources:
        **rule_resources("experiment_metrics"),
    script:
        "../workflow_scripts/combine_seeds.py"


rule summary:
    input:
        metrics=expand(
            f"{RESULTS}/{{experiment}}/metrics.tsv", experiment=DEFAULT_EXPERIMENTS
        ),
        evaluations=[
            f"{RESULTS}/{e}/seed{SEEDS[0]}/metrics.json" for e in DEFAULT_EXPERIMENTS
        ],
        cues=run_files("cross_scale_cue.tsv", DEFAULT_EXPERIMENTS, SEEDS),
    output:
        summary=report(
            f"{RESULTS}/summary.tsv",
            caption="../report/summary.rst",
            category="0. Summary",
        ),
        checks=report(
            f"{RESULTS}/benchmark_checks.tsv",
            caption="../report/checks.rst",
            category="0. Summary",
        ),
        cues=f"{RESULTS}/cross_scale_cue.tsv",
    log:
        f"{RESULTS}/logs/summary.log",
    benchmark:
        f"{RESULTS}/benchmarks/summary/summary.tsv"
    conda:
        "../envs/core.yaml"
    resources:
        **rule_resources("summary"),
    script:
        "../workflow_scripts/summary.py"


rule multiseed_summary:
    input:
        metrics=[m for e in EXPERIMENTS for m in seed_metrics(e, STUDY_SEEDS)],
        evaluations=[
            f"{RESULTS}/{e}/seed{STUDY_SEEDS[0]}/metrics.json" for e in EXPERIMENTS
        ],
        cues=run_files("cross_scale_cue.tsv", EXPERIMENTS, STUDY_SEEDS),
    output:
        summary=f"{RESULTS}/multiseed/summary.tsv",
        checks=f"{RESULTS}/multiseed/benchmark_checks.tsv",
        cues=f"{RESULTS}/multiseed/cross_scale_cue.tsv",
    log:
        f"{RESULTS}/logs/multiseed_summary.log",
    conda:
        "../envs/core.yaml"
    resources:
        **rule_resources("multiseed_summary"),
    script:
        "../workflow_scripts/summary.py"
