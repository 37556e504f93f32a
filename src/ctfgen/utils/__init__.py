"""The lowest layer: errors, atomic files, fingerprints, images, option checks, Hub I/O, torchrun
helpers and run directories. It imports nothing else from ctfgen."""
