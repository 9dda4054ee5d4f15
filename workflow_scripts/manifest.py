"""Check every slide of the manifest (docs/slides.md); write the checked manifest."""

import sys

from madflow.io import write_atomic
from madflow.manifest import ManifestError, check_manifest, unmatched_class_keys
from madflow.runlog import setup

log = setup(snakemake.log[0])
p = snakemake.params
try:
    checked, rejected = check_manifest(
        snakemake.input.table, p.mags, p.tile_px, p.bad_slides, p.test_frac, p.seed, p.class_map
    )
except ManifestError as err:
    log.error("%s", err)
    print(f"madflow: {err}", file=sys.__stderr__)
    sys.exit(1)
for row in rejected.itertuples():
    log.warning("skipped %s: %s", row.slide_id, row.cause)
    print(f"madflow: skipped slide {row.slide_id}: {row.cause}", file=sys.__stderr__)
for row in checked[checked["notes"] != ""].itertuples():
    log.warning("%s: %s", row.slide_id, row.notes)
    print(f"madflow: slide {row.slide_id}: {row.notes}", file=sys.__stderr__)
for warning in unmatched_class_keys(checked, p.class_map):
    log.warning("%s", warning)
    print(f"madflow: {warning}", file=sys.__stderr__)
if not (checked.loc[checked["split"] == "test", "classes"] != "").any():
    log.warning("no test slide has labels: the labelled metrics will be reported as not applicable")
log.info("%d slides checked, %d rejected", len(checked), len(rejected))
write_atomic(snakemake.output.rejected, lambda t: rejected.to_csv(t, sep="\t", index=False))
write_atomic(snakemake.output.manifest, lambda t: checked.to_csv(t, sep="\t", index=False))
