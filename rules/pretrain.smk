# Only what training reads is a training input: train_config.json holds model, train, tiling
# and the experiment's settings, so editing evaluate.* or another experiment retrains nothing.
# The full config, commit and package versions go to provenance.json, which no job trains on.


rule train_config:
    output:
        config=f"{RESULTS}/{{experiment}}/train_config.json",
    log:
        f"{RESULTS}/logs/train_config/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_config/{{experiment}}.tsv"
    conda:
        "../envs/core.yaml"
    resources:
        **rule_resources("train_config"),
    params:
        config=training_config,
    script:
        "../workflow_scripts/train_config.py"


rule provenance:
    output:
        provenance=f"{RESULTS}/{{experiment}}/provenance.json",
    log:
        f"{RESULTS}/logs/provenance/{{experiment}}.log",
    # the training env: its package versions are the ones recorded
    conda:
        "../envs/torch.yaml"
    resources:
        **rule_resources("provenance"),
    params:
        config=provenance_config,
    script:
        "../workflow_scripts/provenance.py"


rule pretrain:
    input:
        config=f"{RESULTS}/{{experiment}}/train_config.json",
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
        "../envs/torch.yaml"
    threads: rule_threads("pretrain")
    resources:
        **pretrain_resources(),
    params:
        launcher=pretrain_launcher,
        init=init_argument,
        device=job_device,
        # checkpoints live beside, not as declared outputs: Snakemake deletes declared
        # outputs of a killed job, and a rerun must resume from them
        out_dir=lambda wildcards, output: str(Path(output.encoder).parent),
    shell:
        "{params.launcher} -m madflow.train --config {input.config:q}"
        " --experiment {wildcards.experiment:q} --tables {input.tables:q}"
        " --out {params.out_dir:q} --seed {wildcards.seed:q} --device {params.device}"
        " {params.init} > {log:q} 2>&1"


rule embed:
    input:
        tables=part_tables,
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
        "../envs/torch.yaml"
    threads: rule_threads("embed")
    resources:
        **rule_resources("embed"),
    params:
        settings=lambda wildcards: experiment_settings(wildcards.experiment),
        tile_px=config["tiling"]["tile_px"],
        batch_size=config["embed"]["batch_size"],
        device=job_device,
    script:
        "../workflow_scripts/embed.py"


rule export_features:
    input:
        embeddings=embedding_part,
        coords=expand(
            f"{RESULTS}/tiles/coords/{{mag}}x/{{{{slide_id}}}}.h5", mag=MAG_NAMES
        ),
    output:
        h5=expand(
            f"{RESULTS}/{{{{experiment}}}}/seed{{{{seed}}}}/features/{{mag}}x/h5_files/{{{{slide_id}}}}.h5",
            mag=MAG_NAMES,
        ),
        pt=expand(
            f"{RESULTS}/{{{{experiment}}}}/seed{{{{seed}}}}/features/{{mag}}x/pt_files/{{{{slide_id}}}}.pt",
            mag=MAG_NAMES,
        ),
        # TRIDENT's job layout (Processor, a91fa84): patches/ and features_{encoder}/
        trident_patches=expand(
            f"{RESULTS}/{{{{experiment}}}}/seed{{{{seed}}}}/features/trident/{{folder}}/patches/{{{{slide_id}}}}_patches.h5",
            folder=TRIDENT_FOLDERS,
        ),
        trident_features=expand(
            f"{RESULTS}/{{{{experiment}}}}/seed{{{{seed}}}}/features/trident/{{folder}}/features_madflow_{{{{experiment}}}}/{{{{slide_id}}}}.h5",
            folder=TRIDENT_FOLDERS,
        ),
    log:
        f"{RESULTS}/logs/export_features/{{experiment}}_seed{{seed}}_{{slide_id}}.log",
    # CLAM's .pt files are written with torch.save
    conda:
        "../envs/torch.yaml"
    resources:
        **rule_resources("export_features"),
    params:
        mags=MAGS,
    script:
        "../workflow_scripts/export_features.py"
