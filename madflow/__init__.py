"""madflow: Magnification-Aware Distillation for whole-slide images."""
