# madflow: Magnification-Aware Distillation on whole-slide images.
# Chain: manifest -> tile -> pretrain -> embed -> evaluate -> figures/report.


configfile: "config.yaml"


include: "rules/common.smk"


rule all:
    input:
        f"{RESULTS}/summary.tsv",
        f"{RESULTS}/slides.tsv",
        f"{RESULTS}/figures/figures.done",


include: "rules/tiles.smk"
include: "rules/pretrain.smk"
include: "rules/evaluate.smk"
include: "rules/targets.smk"
