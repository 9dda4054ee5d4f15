rule experiment_config:
    output:
        config=f"{RESULTS}/{{experiment}}/config.json",
    log:
        f"{RESULTS}/logs/experiment_config/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/experiment_config/{{experiment}}.tsv"
    conda:
        "../envs/madflow.yaml"
    params:
        config=config,
    script:
        "../workflow_scripts/provenance.py"


rule pretrain:
    input:
        config=f"{RESULTS}/{{experiment}}/config.json",
        tables=train_tables,
        init=init_encoder,
    output:
        encoder=f"{RESULTS}/{{experiment}}/seed{{seed}}/encoder.pt",
        train_log=f"{RESULTS}/{{experiment}}/seed{{seed}}/train_log.tsv",
        cue=f"{RESULTS}/{{experiment}}/seed{{seed}}/cross_scale_cue.tsv",
    log:
        f"{RESULTS}/logs/pretrain/{{experiment}}_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{experiment}}_seed{{seed}}.tsv"
    conda:
        "../envs/madflow.yaml"
    threads: 2
    params:
        launcher=pretrain_launcher,
        init=init_argument,
        # checkpoints live beside, not as declared outputs: Snakemake deletes declared
        # outputs of a killed job, and a rerun must resume from them
        out_dir=lambda wildcards, output: str(Path(output.encoder).parent),
    shell:
        "{params.launcher} -m madflow.train --config {input.config:q}"
        " --experiment {wildcards.experiment:q} --tables {input.tables:q}"
        " --out {params.out_dir:q} --seed {wildcards.seed:q} {params.init} > {log:q} 2>&1"


rule embed:
    input:
        tables=part_tables,
        config=f"{RESULTS}/{{experiment}}/config.json",
        encoder=encoder_input,
    output:
        embeddings=directory(
            f"{RESULTS}/{{experiment}}/seed{{seed}}/embeddings/part{{part}}"
        ),
    log:
        f"{RESULTS}/logs/embed/{{experiment}}_seed{{seed}}_part{{part}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/{{experiment}}_seed{{seed}}_part{{part}}.tsv"
    conda:
        "../envs/madflow.yaml"
    threads: 1
    params:
        settings=lambda wildcards: experiment_settings(wildcards.experiment),
        tile_px=config["tiling"]["tile_px"],
        batch_size=config["embed"]["batch_size"],
    script:
        "../workflow_scripts/embed.py"
