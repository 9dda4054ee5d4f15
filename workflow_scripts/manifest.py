"""Check every slide of the manifest (SPEC section 2); write the checked manifest."""

import logging
import sys

from madflow.manifest import ManifestError, check_manifest
from madflow.tiling import write_atomic

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(message)s")
p = snakemake.params
try:
    checked, rejected = check_manifest(
        snakemake.input.table, p.mags, p.tile_px, p.bad_slides, p.test_frac, p.seed
    )
except ManifestError as err:
    logging.error("%s", err)
    sys.exit(f"madflow: {err}")
for row in rejected.itertuples():
    logging.warning("skipped %s: %s", row.slide_id, row.cause)
    print(f"madflow: skipped slide {row.slide_id}: {row.cause}", file=sys.stderr)
logging.info("%d slides checked, %d rejected", len(checked), len(rejected))
write_atomic(snakemake.output.rejected, lambda t: rejected.to_csv(t, sep="\t", index=False))
write_atomic(snakemake.output.manifest, lambda t: checked.to_csv(t, sep="\t", index=False))
