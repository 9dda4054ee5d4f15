"""Procedural H&E-like whole-slide images: the embedded synthetic benchmark.

Writes Aperio-style pyramidal TIFF (``.svs``) that OpenSlide opens as vendor ``aperio``
(objective power 40, MPP 0.25, levels at downsample 1/4/16, 256 px JPEG tiles) plus a
QuPath-style GeoJSON ground truth (one MultiPolygon feature per class, level-0 px).

Modules: render (the tissue model and renderer), pyramid (TIFF writers), demo (slides,
GeoJSON and manifest). Design:

* Everything is rendered at level 0 (40x, 0.25 um/px) in physical units, so the
  box-downsampled pyramid shows each scale by itself: nuclei at 40x (16 um tile field),
  cell arrangement and fibres at 10x (64 um), architecture at 2.5x (256 um).
* The class layout is a domain-warped Voronoi partition on a 16 px label grid (shared
  with the GeoJSON, so the labels are exact); the tissue mask is the slide minus an
  irregular margin and a few tears.
* Rendering is fully procedural (hashed value noise, jittered-grid point processes,
  stamped nucleus sprites), so any rectangle can be rendered on its own: level 0 is
  written tile row by tile row from a generator and memory stays modest for any size.
* No colour shortcut: each class is first rendered as canonical H&E optical density;
  then each OD channel of each class is rank-transformed (histogram matched, exactly,
  from a first pass over the slide) to one shared reference distribution (the 1-D
  Wasserstein barycentre of the classes), and only then is the per-slide stain variation
  (jittered H and E vectors and intensities, background tint) applied. Class means and
  per-channel marginals are therefore equal within a slide, while stains vary across slides.
* Scale confusers: tumour nuclei at 40x (8-13 um = 32-52 px), lymphoid micro-aggregates at
  10x (32-48 um = 32-48 px) and necrotic debris clumps at 2.5x (~120-180 um = 30-45 px)
  are dark round blobs of the same pixel size.
"""

from madflow.synth.demo import make_demo, make_slide, slide_seed
from madflow.synth.pyramid import write_pyramid
from madflow.synth.render import CLASSES, SlideModel

__all__ = ["CLASSES", "SlideModel", "make_demo", "make_slide", "slide_seed", "write_pyramid"]
