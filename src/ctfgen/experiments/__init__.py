"""The experiment drivers: a whole pipeline run (`run`), the reproduction, the codebook-size study,
the stage-wise diagnosis and the redundancy measurement."""
