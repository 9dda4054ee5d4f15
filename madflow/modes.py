"""Experiment modes: the one table that says what each `mode:` of an experiment does.

The workflow (which jobs exist), training (which objective and batch sampler), embedding
(which network, or none) and the figures (legend label, colour order) all read this table,
so adding a mode is one entry here plus, for a new objective or sampler, its function.
Free of torch: the Snakefile reads it when it parses the config.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    """What one experiment mode means to every stage of the chain.

    objective   training objective (a step function in madflow.train.steps), None = no training
    groups      how batches are grouped: "pairs" (one a->b pair per batch, drawn by the
                `pairs` weights), "mags" (one magnification per batch), "chain" (a->b->c),
                "pooled" (tiles of every magnification mixed in each batch)
    sampler     which rows a batch holds (madflow.data.sampling.SAMPLERS)
    student     what the student views are: "children" (native tiles of the sampled rows),
                "parent_crops" (the parent's sub-squares upsampled), "parent" (the parent
                itself), None (the objective has no student views)
    embed       what the embed step encodes with: "trained" (the encoder file the pretrain
                job wrote), "color_stats" (no network), "external" (a user's timm model)
    distributed may run as several processes under torchrun
    label       legend text in figures and the report
    """

    name: str
    objective: str | None
    groups: str | None
    sampler: str | None
    student: str | None
    embed: str
    distributed: bool
    label: str

    @property
    def trains(self) -> bool:
        return self.objective is not None

    @property
    def pretrain_job(self) -> bool:
        """The workflow runs a pretrain job (which, for random_init, saves untrained weights)."""
        return self.embed == "trained"


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("mad", "dino", "pairs", "aligned", "children", "trained", True,
             "MAD: parent -> its aligned children"),
        Mode("same_mag", "dino", "mags", "same_tile", "parent", "trained", True,
             "two views of one tile (no cross-scale pairing)"),
        Mode("shuffled", "dino", "pairs", "shuffled", "children", "trained", True,
             "parent -> children of an unrelated parent"),
        Mode("interp", "dino", "pairs", "aligned", "parent_crops", "trained", True,
             "parent -> its own crops, upsampled"),
        Mode("tri", "dino", "chain", "aligned", "children", "trained", True,
             "2.5 -> 10 -> 40 chains in one example"),
        Mode("dino", "dino", "pooled", "pooled", "multicrop", "trained", True,
             "stage 1: DINO multi-crop on every magnification"),
        Mode("supervised", "supervised", "mags", "labelled", None, "trained", False,
             "positive control, trained with labels"),
        Mode("random_init", None, None, None, None, "trained", False, "untrained network (floor)"),
        Mode("color_stats", None, None, None, None, "color_stats", False, "colour statistics (floor)"),
        Mode("external", None, None, None, None, "external", False, "a user's encoder"),
    )
}
DEFAULT_MODE = "mad"


def get_mode(name: str | None) -> Mode:
    """The registry entry of a mode name (None = the default, mad); unknown names are errors."""
    name = DEFAULT_MODE if name is None else str(name)
    if name not in MODES:
        raise ValueError(f"unknown experiment mode {name!r}; known: {sorted(MODES)}")
    return MODES[name]
