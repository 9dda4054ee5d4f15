rule demo_slides:
    output:
        manifest=f"{RESULTS}/demo/manifest.tsv",
    log:
        f"{RESULTS}/logs/demo_slides.log",
    benchmark:
        f"{RESULTS}/benchmarks/demo_slides/demo.tsv"
    conda:
        "../envs/core.yaml"
    threads: rule_threads("demo_slides")
    resources:
        **rule_resources("demo_slides"),
    params:
        demo=config["demo"],
        seed=config["seed"],
    script:
        "../workflow_scripts/demo_slides.py"


checkpoint manifest:
    input:
        table=manifest_source(),
        slides_and_labels=MANIFEST_INPUT_FILES,
    output:
        manifest=f"{RESULTS}/manifest.tsv",
        rejected=f"{RESULTS}/manifest_rejected.tsv",
    log:
        f"{RESULTS}/logs/manifest.log",
    benchmark:
        f"{RESULTS}/benchmarks/manifest/manifest.tsv"
    conda:
        "../envs/core.yaml"
    resources:
        **rule_resources("manifest"),
    params:
        mags=MAGS,
        tile_px=config["tiling"]["tile_px"],
        bad_slides=config["bad_slides"],
        test_frac=config["test_frac"],
        seed=config["seed"],
        class_map=config["classes"],
        fingerprints=manifest_input_fingerprints(),
    script:
        "../workflow_scripts/manifest.py"


rule tile:
    input:
        unpack(slide_files),
    output:
        table=f"{RESULTS}/tiles/{{slide_id}}.parquet",
        qc=f"{RESULTS}/tiles/qc/{{slide_id}}.png",
        coords=expand(
            f"{RESULTS}/tiles/coords/{{mag}}x/{{{{slide_id}}}}.h5",
            mag=MAG_NAMES,
        ),
    log:
        f"{RESULTS}/logs/tile/{{slide_id}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tile/{{slide_id}}.tsv"
    conda:
        "../envs/core.yaml"
    resources:
        **rule_resources("tile"),
    params:
        mags=MAGS,
        tile_px=config["tiling"]["tile_px"],
        min_tissue=config["tiling"]["min_tissue"],
        slide=slide_row,
        class_map=slide_class_map,
    script:
        "../workflow_scripts/tile.py"


rule slides_overview:
    input:
        manifest=f"{RESULTS}/manifest.tsv",
        rejected=f"{RESULTS}/manifest_rejected.tsv",
        tables=tile_tables,
    output:
        overview=report(
            f"{RESULTS}/slides.tsv",
            caption="../report/slides.rst",
            category="0. Slides",
        ),
    log:
        f"{RESULTS}/logs/slides_overview.log",
    conda:
        "../envs/core.yaml"
    resources:
        **rule_resources("slides_overview"),
    params:
        mags=MAGS,
    script:
        "../workflow_scripts/slides_overview.py"
