"""The configuration edge: Hydra composition, the checks that need no model, and stage lists turned into stage configs."""
