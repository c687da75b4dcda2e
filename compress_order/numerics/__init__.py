"""Pure tensor kernels: integer and float grids, pruning masks, the constraints later stages keep, the OBS column solver."""
