"""The command line: `compress-order run` (the Hydra app), validate, list, export and the analysis commands."""
